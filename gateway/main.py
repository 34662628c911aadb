"""Entry point of ``bazaar gateway start``: keys database, router, uvicorn on uvloop."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from gateway.config import GatewayConfig
from protocol.errors import ConfigError
from protocol.service.http import parse_host_port
from protocol.service.logs import configure_logging

log = logging.getLogger(__name__)


def coordinator_url(config: GatewayConfig, data_dir: Path) -> str:
    if config.coordinator_url:
        return config.coordinator_url.rstrip("/")
    path = data_dir / "coordinator.json"
    try:
        return str(json.loads(path.read_text())["http"])
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"no coordinator URL given and none found in {path} ({e}); "
            "pass --coordinator-url http://HOST:PORT"
        ) from None


SECRET_ENV = "BAZAAR_GATEWAY_SECRET"


def gateway_secret(config: GatewayConfig) -> str:
    """This gateway's secret at the coordinator: ``$BAZAAR_GATEWAY_SECRET``, else the contents
    of ``secret_file``; ``ConfigError`` (with the fix) if there is none."""
    secret = os.environ.get(SECRET_ENV, "").strip()
    if not secret and config.secret_file:
        try:
            secret = Path(config.secret_file).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the gateway's secret_file: {e}") from None
    if not secret:
        raise ConfigError(
            "no gateway secret: the coordinator shows serving nodes only to gateways it admits. "
            "Run `bazaar gateway admit NAME` on the coordinator's machine (it prints the secret "
            f"once), then set {SECRET_ENV} or --secret_file=FILE"
        )
    return secret


def _exit_cleanly(signum: int, frame: object) -> None:
    sys.exit(0)


def start_gateway(config: GatewayConfig, data_dir: Path) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.routing import Router, TokenCounter
    from protocol.accounts import KeyStore, open_database

    configure_logging(config.log_json)
    url = coordinator_url(config, data_dir)
    secret = gateway_secret(config)
    store = KeyStore(open_database(config.db or f"sqlite:///{data_dir / 'gateway.db'}"))
    router = Router(url, secret, config.refresh_s)
    app = create_app(config, store, router, TokenCounter(config.tokenizers))
    host, port = parse_host_port(config.listen)
    log.info("gateway on http://%s:%d, routing through the coordinator at %s", host, port, url)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again under the
    # handlers it found: make that a clean exit, so a stopped gateway exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools", log_config=None,
                access_log=False, proxy_headers=False, server_header=False)  # fmt: skip
    return 0
