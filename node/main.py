"""Entry point of ``bazaar node start``: identity, machine probe, membership agent, metrics."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from node.config import NodeConfig
from protocol.errors import ConfigError
from protocol.identity import KEY_FILE_NAME, load_or_create_identity
from protocol.service.http import parse_host_port
from protocol.service.lifecycle import find_exception, run_until_signal
from protocol.service.logs import configure_logging

if TYPE_CHECKING:
    from node.agent import NodeAgent
    from node.roles.base import Role
    from node.roles.inference import InferenceRole
    from node.roles.serving import ServingRole
    from node.roles.trainer import TrainerRole
    from node.roles.verifier import VerifierRole

log = logging.getLogger(__name__)

EXIT_REFUSED = 3
"""Exit code when the coordinator refuses the node (its message is printed)."""


def coordinator_addrs(config: NodeConfig, data_dir: Path) -> list[str]:
    """The coordinator to dial: its multiaddr from the config, the multiaddrs its REST API
    (``http://HOST:PORT``) gives, or those a local coordinator wrote to the data directory."""
    if config.coordinator.startswith(("http://", "https://")):
        return _addrs_from_api(config.coordinator.rstrip("/"))
    if config.coordinator:
        return [config.coordinator]
    path = data_dir / "coordinator.json"
    try:
        addrs = json.loads(path.read_text())["multiaddrs"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"no coordinator given and none found in {path} ({e}); "
            f"pass --coordinator /ip4/HOST/tcp/PORT/p2p/PEER_ID"
        ) from None
    return list(addrs)


def _addrs_from_api(url: str, wait_s: float = 60.0) -> list[str]:
    """The coordinator's multiaddrs from its ``/health``, waiting up to ``wait_s`` for it to
    answer (a node may start before its coordinator, as in a compose file)."""
    import httpx

    deadline = time.monotonic() + wait_s
    while True:
        try:
            health = httpx.get(f"{url}/health", timeout=5).json()
            peer = health["peer_id"]
            # a coordinator listening on 0.0.0.0 is reached where its REST API was
            here = socket.gethostbyname(httpx.URL(url).host)
            addrs = [a.replace("/ip4/0.0.0.0/", f"/ip4/{here}/") for a in health["multiaddrs"]]
            return [a if "/p2p/" in a else f"{a}/p2p/{peer}" for a in addrs]
        except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
            if time.monotonic() > deadline:
                raise ConfigError(f"no coordinator answering at {url}/health ({e})") from None
            log.info("waiting for the coordinator at %s (%s)", url, e)
            time.sleep(1.0)


def start_node(
    config: NodeConfig,
    data_dir: Path,
    inference_cls: type[InferenceRole] | None = None,
    producer: str = "",
    trainer_cls: type[TrainerRole] | None = None,
    verifier_cls: type[VerifierRole] | None = None,
    serving_cls: type[ServingRole] | None = None,
) -> int:
    """Run a node until a signal. ``inference_cls`` replaces ``InferenceRole``,
    ``trainer_cls`` ``TrainerRole``, ``verifier_cls`` ``VerifierRole``, ``serving_cls``
    ``ServingRole``, ``producer`` the model process's ``Producer`` (``module:Class``): tests
    build misbehaving nodes so."""
    from node.agent import JoinRefused, NodeAgent
    from node.model.probe import probe_machine

    configure_logging(config.log_json)
    addrs = coordinator_addrs(config, data_dir)  # a usage error before anything is created
    identity, created = load_or_create_identity(data_dir / KEY_FILE_NAME)
    if created:
        log.info("created identity %s in %s", identity.peer_id, data_dir)
    caps = probe_machine(config.roles)  # type: ignore[arg-type]
    agent = NodeAgent(config, identity, caps, addrs)
    roles = _roles(config, data_dir, agent, inference_cls, producer, trainer_cls, verifier_cls,
                   serving_cls)  # fmt: skip
    if config.metrics_listen:
        from prometheus_client import start_http_server

        host, port = parse_host_port(config.metrics_listen)
        start_http_server(port, host, registry=agent.metrics.registry)

    async def main(stop: trio.Event) -> int:
        try:
            await agent.run(stop, roles)
        except BaseException as e:
            refused = find_exception(e, JoinRefused)
            if refused is None:
                raise
            log.error("the coordinator refused this node: %s", refused)
            print(f"refused: {refused}", flush=True)
            return EXIT_REFUSED
        return 0

    return run_until_signal(main)


def _roles(
    config: NodeConfig,
    data_dir: Path,
    agent: NodeAgent,
    inference_cls: type[InferenceRole] | None,
    producer: str,
    trainer_cls: type[TrainerRole] | None = None,
    verifier_cls: type[VerifierRole] | None = None,
    serving_cls: type[ServingRole] | None = None,
) -> list[Role]:
    """The node's roles, sharing one model process (inference, verifier, serving) and one
    adapter store with its shards (all of them)."""
    from node.store.adapters import AdapterStore
    from node.store.versions import VersionSync
    from protocol.payload_store import PayloadStore

    versions = VersionSync(
        config.model, AdapterStore(data_dir / "adapters"), PayloadStore(data_dir / "shards")
    )
    roles: list[Role] = []
    if "trainer" in config.roles:
        from node.roles.trainer import TrainerRole

        roles.append((trainer_cls or TrainerRole)(config, data_dir, versions))
    if not (config.serve or {"inference", "verifier"} & set(config.roles)):
        return roles
    from node.model.worker import ModelSpec, ModelWorker

    spec = ModelSpec.of(config, data_dir)
    if producer:
        spec = dataclasses.replace(spec, producer=producer)
    model = ModelWorker(spec)
    if "inference" in config.roles:
        from node.roles.inference import InferenceRole

        roles.append((inference_cls or InferenceRole)(config, data_dir, model, versions=versions))
    if "verifier" in config.roles:
        from node.roles.verifier import VerifierRole

        roles.append((verifier_cls or VerifierRole)(config, model, versions, data_dir))
    if config.serve:
        from node.roles.serving import ServingRole
        from protocol.service.http import bind_tcp

        host, port = parse_host_port(config.serve_listen)
        sock = bind_tcp(host, port)
        url = config.serve_url.rstrip("/") or f"http://{host}:{sock.getsockname()[1]}"
        # the coordinator learns the endpoint with the join; the gateway reads it from there
        role = (serving_cls or ServingRole)(model, sock, config.model, versions.adapters,
                                            versions=versions,
                                            token_skew_s=config.serve_token_skew_s)  # fmt: skip
        agent.capabilities = msgspec.structs.replace(
            agent.capabilities, serving_url=url, serving_models=role.models()
        )
        roles.append(role)
        log.info("serving %s at %s/v1", config.model, url)
    return roles
