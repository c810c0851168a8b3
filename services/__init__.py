"""cadre's services: one deployable process per package, each started with ``python -m services.<name>``."""
