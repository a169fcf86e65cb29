"""A point's life after it is taken: deletion, the trash, purge and retention."""
