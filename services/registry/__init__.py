"""The registry: the only writer of model versions."""
