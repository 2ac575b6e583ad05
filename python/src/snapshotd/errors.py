"""Exceptions that carry the daemon's error code and message."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.IntEnum):
    """The codes of include/snapshotd.h (``snapshotd_status``): 1–99 are the daemon's, 100+ the library's."""

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
    Instances pickle with both (``torch.distributed`` gathers a rank's
    exception to the coordinator that way).
    """

    def __init__(self, code: int, message: str) -> None:
        try:
            self.code: ErrorCode | int = ErrorCode(code)
        except ValueError:
            self.code = int(code)
        self.message = message
        name = self.code.name if isinstance(self.code, ErrorCode) else str(code)
        super().__init__(f"{name} ({int(code)}): {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce re-calls __init__ with ``args`` (the formatted
        # text alone); rebuild from code and message instead, keeping any
        # attributes set since (``__dict__``).
        return type(self), (int(self.code), self.message), self.__dict__


class DaemonUnavailableError(SnapshotdError):
    """The daemon is down, unreachable, or the connection to it broke."""


def error_for(code: int, message: str) -> SnapshotdError:
    """The exception for a failing call's status: :class:`DaemonUnavailableError` for a lost connection."""
    return (DaemonUnavailableError if code == ErrorCode.CONNECTION else SnapshotdError)(code, message)
