"""Structured logging shared by every process, and a limiter for logs peers can trigger.

``configure_logging(json_lines=True)`` writes one JSON object per line (``ts``, ``level``,
``logger``, ``msg`` and any ``extra=`` fields); otherwise a readable line with the extras as
``key=value``. ``RateLimit`` lets a process log a misbehaving peer once per key per minute, so a
peer cannot flood our logs by flooding us with bad frames.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Hashable

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        return f"{line} {extras}" if extras else line


def configure_logging(json_lines: bool = False, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # py-libp2p logs every refused stream and dropped peer at INFO; keep only its warnings.
    logging.getLogger("libp2p").setLevel(logging.WARNING)


class RateLimit:
    """``allow(key)`` is True at most once per ``period_s`` for each key."""

    def __init__(self, period_s: float = 60.0, max_keys: int = 10_000) -> None:
        self.period_s = period_s
        self.max_keys = max_keys
        self._last: dict[Hashable, float] = {}

    def allow(self, key: Hashable, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self.period_s:
            return False
        if len(self._last) >= self.max_keys:
            self._last = {k: t for k, t in self._last.items() if now - t < self.period_s}
        self._last[key] = now
        return True
