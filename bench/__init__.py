"""cadre's benchmarks (`make bench`): figures, never pass/fail gates for CI."""
