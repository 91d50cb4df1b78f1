"""The one base for errors that carry a stable code and structured details.

Model code raises subclasses that are also ValueError/RuntimeError (so plain
callers can catch them as such); the service layer adds its own on top.
"""
from __future__ import annotations


class DetailedError(Exception):
    code = "error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
