"""The service's decisions, in plain Python: no HTTP, no Ray.

Routers call these; they take the pipeline client, the repository and the
object store as arguments, so unit tests drive them with fakes.
"""
