"""A point's life after it is taken: the clock of lifecycle decisions, retention plans,
deletion, the trash and purge."""
