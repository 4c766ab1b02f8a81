"""Structured logging: JSON lines in production, a readable console in development.

Context such as the stream entry id or the device is bound once with
``log.bind(...)`` and travels with every line after it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog


def configure_logging(
    fmt: Literal["json", "console"] = "json", level: str = "info", stream: Any = None
) -> None:
    """Configure structlog and the stdlib root logger once, at start-up."""
    out = stream if stream is not None else sys.stderr
    numeric = logging.getLevelName(level.upper())
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=numeric, stream=out, format="%(levelname)s %(name)s %(message)s")


def get_logger(name: str, **context: Any) -> structlog.typing.FilteringBoundLogger:
    """A logger for a component, with optional context bound up front."""
    # A lazy proxy: binding now would freeze the logger before configure_logging runs.
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(
        name, component=name, **context
    )
    return logger
