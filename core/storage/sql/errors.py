"""Telling a database that went away from other SQL errors (raised as `StorageUnavailable`)."""

from __future__ import annotations

import asyncpg
from sqlalchemy import exc as sa_exc

from core.errors import StorageUnavailable

__all__ = ["StorageUnavailable", "is_unavailable"]


#: Driver-level signs of a database that went away (asyncpg's own, and the socket's).
_GONE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, cannot connect now
    # A connection whose last operation was cut off mid-way ("another operation is in
    # progress"): it is discarded, and the next one has to reach the database anew.
    asyncpg.InternalClientError,
)


def is_unavailable(error: BaseException) -> bool:
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
            return True
        cause = error.orig.__cause__ if error.orig is not None else None
        return isinstance(error.orig, _GONE) or isinstance(cause, _GONE)
    return isinstance(error, _GONE)
