"""Each run's log: the coordinator's own log lines about a run (those logged with a ``run_id``),
kept in memory for ``GET /v1/runs/{id}/logs`` and ``bazaar run logs RUN -f``.

A ``logging.Handler`` on the coordinator's loggers, so every place that logs about a run (runs
created, versions recorded, rounds, penalties, cancels, deployments) feeds it with no second
call; the newest ``keep`` lines of each run are kept, numbered so a follower asks for what came
after the last it saw. A restarted coordinator starts each run's log afresh.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any


class RunLog(logging.Handler):
    def __init__(self, keep: int = 2000) -> None:
        super().__init__(level=logging.INFO)
        self.keep = keep
        self.lines: dict[str, deque[dict[str, Any]]] = {}
        self.count: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        run_id = getattr(record, "run_id", None)
        if not isinstance(run_id, str):
            return
        seq = self.count.get(run_id, 0) + 1
        self.count[run_id] = seq
        lines = self.lines.setdefault(run_id, deque(maxlen=self.keep))
        lines.append({"seq": seq, "at": record.created, "level": record.levelname,
                      "message": record.getMessage()})  # fmt: skip

    def after(self, run_id: str, seq: int = 0) -> list[dict[str, Any]]:
        """The run's kept lines numbered above ``seq``, oldest first."""
        self.acquire()  # emit runs under the same lock, from any thread
        try:
            return [line for line in self.lines.get(run_id, ()) if line["seq"] > seq]
        finally:
            self.release()
