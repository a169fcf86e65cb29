"""Disks and their points: the live disk's block map and copy-before-write, freezing
and archiving, the registry of open disks, and the disk commands."""
