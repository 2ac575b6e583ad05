"""Exceptions that carry the daemon's error code and message."""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """The codes of include/snapshotd.h: 1–99 are the daemon's, 100+ the library's."""

    MALFORMED_FRAME = 1
    UNAUTHENTICATED = 2
    HELLO_REQUIRED = 3
    INVALID_REQUEST = 4
    WRONG_JOB = 5
    DUPLICATE_RANK = 6
    UNKNOWN_STEP = 7
    OVER_BUDGET = 8
    CHECKSUM_MISMATCH = 9
    NOT_COMMITTED = 10
    SAVE_IN_PROGRESS = 11
    TOO_MANY_CONNECTIONS = 12
    TIMEOUT = 13
    UNRECOVERABLE = 14
    SHUTTING_DOWN = 15
    INTERNAL = 16
    UNAVAILABLE = 17
    CONNECTION = 100
    INVALID_ARGUMENT = 101
    PROTOCOL = 102


class SnapshotdError(Exception):
    """A call the daemon (or the client library) refused.

    ``code`` is an :class:`ErrorCode` (or the raw int for a code this
    version does not know); ``message`` is the daemon's own explanation.
    """

    def __init__(self, code: int, message: str) -> None:
        try:
            self.code: ErrorCode | int = ErrorCode(code)
        except ValueError:
            self.code = code
        self.message = message
        name = self.code.name if isinstance(self.code, ErrorCode) else str(code)
        super().__init__(f"{name} ({code}): {message}")


class DaemonUnavailableError(SnapshotdError):
    """The daemon is down, unreachable, or the connection to it broke."""
