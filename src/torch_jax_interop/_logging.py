"""The command line's logging: one setup for every subcommand, text or JSON lines.

Imports no framework. Library code only ever calls ``logging.getLogger(...)``: configuring
handlers is the application's business, so only the CLI calls :func:`setup_logging` (the
house rule: ``logging.basicConfig`` only under ``__main__``).

Note [Worker processes inherit the log settings]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``worker --ranks N`` starts each worker as ``python -m torch_jax_interop.server`` with the
launcher's ``--log-level``, ``--log-format`` and ``--debug`` on its command line
(``cli._worker_argv``), so a group logs in one format; every line carries the pid that
wrote it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
"""What ``--log-level`` accepts."""
LOG_FORMATS: tuple[str, ...] = ("text", "json")
"""What ``--log-format`` accepts."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s"
"""``--log-format text``: time, level, logger, pid, message."""

_HANDLER_NAME = "torch_jax_interop.cli"
_QUIET_LOGGERS = ("jax", "jaxlib", "absl")  # their INFO lines drown the worker's own


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC, milliseconds), ``level``,
    ``logger``, ``pid``, ``message`` and, for an exception, ``exception`` (its traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr) as
    ``fmt`` (``text``: :data:`TEXT_FORMAT`; ``json``: :class:`JsonLinesFormatter`).
    Replaces the handler an earlier call installed (and no other). JAX's own loggers stay
    at WARNING unless ``level`` is ``debug``."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if fmt == "json" else
                         logging.Formatter(TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


__all__ = ["LOG_FORMATS", "LOG_LEVELS", "TEXT_FORMAT", "JsonLinesFormatter", "setup_logging"]
