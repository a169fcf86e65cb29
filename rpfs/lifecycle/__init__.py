"""Point lifecycle: the clock, retention plans, delete, trash, undelete and purge."""
