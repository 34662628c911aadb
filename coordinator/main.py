"""Entry point of ``bazaar coordinator start``: load identity and config, run until a signal."""

from __future__ import annotations

from pathlib import Path

import trio

from coordinator.config import CoordinatorConfig
from protocol.identity import load_or_create_identity
from protocol.service.lifecycle import run_until_signal
from protocol.service.logs import configure_logging

KEY_FILE = "coordinator.key"
"""The coordinator's own key, apart from a node's ``identity.key`` in the same directory."""


def start_coordinator(config: CoordinatorConfig, data_dir: Path) -> int:
    from coordinator.server import Coordinator

    configure_logging(config.log_json)
    identity, _ = load_or_create_identity(data_dir / KEY_FILE)

    async def main(stop: trio.Event) -> int:
        await Coordinator(config, identity, data_dir).run(stop)
        return 0

    return run_until_signal(main)
