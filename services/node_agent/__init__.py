"""The node agent: advertises its host's capacity, runs the ranks assigned to it, streams their logs."""
