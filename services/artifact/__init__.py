"""The artifact service: owns run files in the object store; a run is Completed only once they are stored."""
