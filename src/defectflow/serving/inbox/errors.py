"""What an inbox operation raises: `InboxError` and its kinds, each with the HTTP status the
review page answers with."""

from __future__ import annotations


class InboxError(Exception):
    """A review operation that cannot be done; `status` is the HTTP status it maps to."""

    status = 500

    def __init__(self, message: str = "", status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:  # else the class's own
            self.status = status


class ItemNotFound(InboxError):
    status = 404


class ItemNotPending(InboxError):
    status = 409


class InvalidReview(InboxError):
    status = 400
