"""ApiError: an error with an HTTP status and a message saying what was given and what was expected."""

from __future__ import annotations

__all__ = ["ApiError"]


class ApiError(Exception):
    """Raised anywhere in request handling; the app turns it into ``{"status": {"error": msg}, "time"}``."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message

    def __repr__(self) -> str:
        return f"ApiError({self.status_code}, {self.message!r})"
