"""Structured log lines: fields become keys, and an exception is logged with its traceback."""

from __future__ import annotations

import json
import logging

import pytest

from services.shared.logs import JsonFormatter, log_event

pytestmark = pytest.mark.unit


def test_log_event_takes_an_exception_with_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.logs")
    with caplog.at_level(logging.ERROR, logger="test.logs"):
        try:
            raise ValueError("boom")
        except ValueError as exc:
            log_event(logger, logging.ERROR, "writer failed", error="ValueError: boom", exc_info=exc)
    (record,) = caplog.records
    line = json.loads(JsonFormatter("writers").format(record))
    assert line["message"] == "writer failed" and line["error"] == "ValueError: boom"
    assert line["component"] == "writers" and "ValueError: boom" in line["exc"] and "Traceback" in line["exc"]
