"""A served network for gateway tests: a real coordinator, a real node serving the tiny model
(with two versions of a run's adapter, ``demo@1`` and ``demo@2``, in its store from the start),
and a real gateway process (uvicorn + uvloop) with its own database of keys."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from node.store.adapters import AdapterStore
from protocol.accounts import KeyStore, open_database
from tests.conftest import free_port
from tests.integration.cluster import Cluster
from tests.lora import random_adapter
from tests.wait import wait_until


@dataclass
class Gateway:
    url: str
    keys: KeyStore
    adapters: AdapterStore
    """The serving node's adapter store."""
    root: Path
    cluster: Cluster
    node_metrics: str
    """The serving node's Prometheus ``/metrics`` URL."""

    def client(self, key: str, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)  # type: ignore[arg-type]

    def direct(self) -> openai.OpenAI:
        """A client of the serving node itself, with the route's serving token (as an admitted
        gateway reaches it)."""
        route = self.cluster.routes()["server"]
        return openai.OpenAI(base_url=f"{route['url']}/v1", api_key=route["token"], max_retries=0)


@contextmanager
def served_network(root: Path, tiny_model: Path) -> Iterator[Gateway]:
    cluster = Cluster(root, interval_s=1.0)
    db = f"sqlite:///{root / 'gateway.db'}"
    try:
        cluster.start_coordinator()
        store = AdapterStore(root / "home-server" / "adapters")
        for version in (1, 2):  # two versions of a run's adapter, held by the node from the start
            lora = random_adapter(tiny_model, root / f"lora{version}", version)
            store.add_dir("demo", version, lora)
        metrics = free_port()
        cluster.start_node("server", extra=["--serve", f"--model_cache={tiny_model.parent.parent}",
                                            f"--metrics_listen=127.0.0.1:{metrics}"])  # fmt: skip
        port = free_port()
        cluster.spawn("gateway", root / "gw-home", [
            "gateway", "start", "--coordinator-url", cluster.url, "--listen", f"127.0.0.1:{port}",
            "--db", db, f"--tokenizers.tiny={tiny_model}", "--refresh_s=0.5",
            "--budget_hold_tokens=64", "--budget_idle_s=0.5",
        ], env=cluster.gateway_env())  # fmt: skip
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            health = httpx.get(f"{url}/health", timeout=2).json()
            return "tiny" in health["models"]

        wait_until(ready, 90, what="the gateway routing to the serving node")
        node_metrics = f"http://127.0.0.1:{metrics}/metrics"
        yield Gateway(url, KeyStore(open_database(db)), store, root, cluster, node_metrics)
    finally:
        cluster.stop_all()
