"""Repository upkeep: its figures (info), its consistency (check), and later garbage
collection and verify: the work that looks at a whole repository rather than a disk."""
