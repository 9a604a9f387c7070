"""The embedded lease store: one SQLite file per machine, shared by its node processes."""
