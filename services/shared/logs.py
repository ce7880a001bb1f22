"""Structured logging: one JSON object a line, with a ``component`` field on every record.

``log_event(logger, level, message, **fields)`` attaches fields (``log_type="DATA_LOSS"``, ``symbol`` ...) that the
JSON formatter writes as top-level keys, so operators can filter with ``jq`` or a log pipeline.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line: time, level, component, message and every extra field."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "component": getattr(record, "component", self.component),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in payload:
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for terminals, with the extra fields appended as key=value."""

    def __init__(self, component: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(component)s: %(message)s%(fields)s", "%H:%M:%S")
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "component"):
            record.component = self.component
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and k != "component"}
        extras.pop("fields", None)
        record.fields = "".join(f" {k}={v}" for k, v in extras.items())
        return super().format(record)


def setup_logging(component: str, level: str = "INFO", fmt: str = "json") -> None:
    """Configure the root logger for a service process; safe to call more than once."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component) if fmt == "json" else TextFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiokafka", "faust", "mode", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def log_event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with ``fields`` as structured keys (``component`` overrides the process default); an
    ``exc_info`` field is the exception to log with its traceback, as in :meth:`logging.Logger.log`."""
    exc_info = fields.pop("exc_info", None)
    logger.log(level, message, exc_info=exc_info, extra=fields)
