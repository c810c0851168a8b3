"""The scheduler: the only writer of placements."""
