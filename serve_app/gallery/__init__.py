"""The gallery: Postgres (source of truth) and object storage for face crops."""
