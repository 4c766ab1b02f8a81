"""Which failures of PostgreSQL and Redis are transient (retry) and which are not."""

from __future__ import annotations

import asyncpg
import redis.exceptions

# SQLSTATE classes that mean "the server or connection, not the data": connection
# exceptions, insufficient resources, operator intervention (shutdown), rollback
# (serialization, deadlock), and cannot-connect-now.
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")


def is_transient(exc: BaseException) -> bool:
    """True when retrying later may succeed: the dependency, not the input, failed."""
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return False  # a malformed DSN or option never heals: refuse to start, say why
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        return state[:2] in _TRANSIENT_CLASSES
    if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError):
        return False  # wrong credentials never heal (redis-py files them as ConnectionError)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        text = str(exc)
        return text.startswith(("LOADING", "BUSY ", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN"))
    return isinstance(exc, redis.exceptions.BusyLoadingError)
