"""No way around the gateway: a client that calls a serving node directly, skipping the gateway's
keys, budgets and usage records, is refused.

Real processes: a coordinator issuing serving tokens with a short lifetime (``TTL``), a node
serving the tiny model that allows ``SKEW`` of clock skew, and an admitted gateway. Checked:

- the official ``openai`` client (any key, a valid gateway API key included) and a bare aiohttp
  request straight to the node get 401 with an OpenAI-style error, and nothing but ``/health``
  answers there; the same request through the gateway is served and metered;
- the coordinator tells serving URLs only to admitted gateways: the routes endpoint refuses
  callers without a gateway secret, and no open view contains a serving URL;
- tokens signed by another key, expired, or made out to another node are refused by the node
  (a token signed right, for it, now, is the control that passes);
- a revoked gateway gets no routes at once, its gateway process stops routing, and the node
  refuses the tokens it still holds once they expire (the bound ``coordinator/gateways.py``
  documents);
- the gateway keeps serving across token rotations: it answers for three token lifetimes in a
  row, which a node that refuses expired tokens allows only to a gateway whose tokens rotate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from protocol.accounts import KeyStore, open_database
from protocol.identity import Identity, load_identity
from protocol.serving_tokens import issue
from tests.conftest import free_port
from tests.integration.cluster import Cluster, Proc
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(240)
TTL, SKEW = 4.0, 1.0
"""The coordinator's token lifetime and the node's skew allowance, short so tokens rotate (and
expire) within the test."""
CHAT = [{"role": "user", "content": "What is 12 + 7?"}]
BODY = {"model": "tiny", "prompt": "ab", "max_tokens": 1}


@dataclass
class Net:
    cluster: Cluster
    root: Path
    tiny: Path
    db: str
    gateway: str
    """The admitted gateway's URL (named ``edge``)."""
    node: dict[str, Any]
    """The serving node's route, as an admitted gateway reads it."""
    key: str
    """An API key at the gateway."""

    def gateway_client(self, url: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url or self.gateway}/v1", api_key=self.key,
                             max_retries=0)  # fmt: skip


def start_gateway(cluster: Cluster, root: Path, tiny: Path, db: str, name: str) -> tuple[str, Proc]:
    port = free_port()
    proc = cluster.spawn(name, root / name, [
        "gateway", "start", "--coordinator-url", cluster.url, "--listen", f"127.0.0.1:{port}",
        "--db", db, f"--tokenizers.tiny={tiny}", "--refresh_s=0.3", f"--name={name}",
    ], env=cluster.gateway_env(name))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: "tiny" in httpx.get(f"{url}/health").json()["models"], 60, what=name)
    return url, proc


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("bypass")
    cluster = Cluster(root, interval_s=1.0)
    db = f"sqlite:///{root / 'gateway.db'}"
    try:
        cluster.start_coordinator(extra=[f"--serving_token_ttl_s={TTL}"])
        cluster.start_node("server", extra=[
            "--serve", f"--model_cache={tiny_model.parent.parent}", "--torch_threads=1",
            f"--serve_token_skew_s={SKEW}",
        ])  # fmt: skip
        node = wait_until(lambda: cluster.routes().get("server"), 60, what="the serving route")
        wait_until(lambda: httpx.get(f"{node['url']}/health").is_success, 90, what="the model")
        url, _ = start_gateway(cluster, root, tiny_model, db, "edge")
        key, _ = KeyStore(open_database(db)).create("app")
        yield Net(cluster, root, tiny_model, db, url, node, key)
    finally:
        cluster.stop_all()


def direct(net: Net, token: str) -> httpx.Response:
    """A completion request straight to the node, with ``token`` as its bearer credential."""
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(f"{net.node['url']}/v1/completions", json=BODY, headers=headers, timeout=30)


def test_a_client_that_skips_the_gateway_is_refused(net: Net) -> None:
    url = net.node["url"]
    for api_key in ("sk-anything", net.key):  # a made-up key, and one the gateway accepts
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
        assert refused.value.status_code == 401 and refused.value.code == "invalid_serving_token"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()

    async def bare() -> tuple[int, Any, str]:
        async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=BODY) as r:
            return r.status, await r.json(), r.headers.get("x-request-id", "")

    status, body, request_id = asyncio.run(bare())
    assert status == 401 and request_id
    assert body["error"]["code"] == "missing_serving_token"
    assert body["error"]["type"] == "authentication_error" and "gateway" in body["error"]["message"]
    assert httpx.get(f"{url}/openapi.json").status_code == 401  # closed unless named open
    assert httpx.get(f"{url}/health").is_success

    def records() -> list[dict[str, Any]]:
        auth = {"authorization": f"Bearer {net.key}"}
        return list(httpx.get(f"{net.gateway}/v1/usage", headers=auth).json()["data"])

    before = records()
    done = net.gateway_client().chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    assert done.choices and done.usage is not None and done.usage.total_tokens > 0
    after = records()  # metered: the request through the gateway, and only that one
    assert len(after) == len(before) + 1 and after[-1]["status"] == 200


def test_only_admitted_gateways_learn_where_serving_nodes_are(net: Net) -> None:
    cluster, url = net.cluster, net.node["url"]
    for headers in ({}, {"Authorization": "Bearer bzg-made-up"},
                    {"Authorization": f"Bearer {net.key}"}):  # fmt: skip
        r = httpx.get(f"{cluster.url}/v1/network/routes", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert url not in r.text
    host_port = url.removeprefix("http://")
    for path in ("/v1/network/nodes", "/health", "/v1/network/verdicts", "/v1/runs", "/"):
        assert host_port not in httpx.get(f"{cluster.url}{path}").text, path
    server = cluster.nodes()["server"]
    assert "serving_url" not in server and server["serving_models"] == ["tiny"]


def test_tokens_not_signed_by_the_coordinator_for_this_node_now_are_refused(net: Net) -> None:
    coordinator = load_identity(net.cluster.coordinator_home / "coordinator.key")
    peer, now = net.node["peer_id"], time.time()
    cases = [
        (issue(Identity.generate(), "edge", peer, now, 300), 401, "invalid_serving_token"),
        (issue(coordinator, "edge", peer, now - 3600, 300), 401, "expired_serving_token"),
        (issue(coordinator, "edge", peer, now + 600, 300), 401, "expired_serving_token"),
        (issue(coordinator, "edge", Identity.generate().peer_id, now, 300), 403, "wrong_audience"),
        (net.node["token"][:-4] + "AAAA", 401, "invalid_serving_token"),  # a signature altered
    ]
    for token, status, code in cases:
        r = direct(net, token)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        assert r.json()["error"]["type"] in ("authentication_error", "permission_error")
    control = direct(net, issue(coordinator, "edge", peer, now, 300))  # the forging is sound
    assert control.status_code == 200 and control.json()["choices"]


def test_a_revoked_gateway_loses_its_routes_at_once_and_the_node_after_expiry(net: Net) -> None:
    cluster = net.cluster
    url, _ = start_gateway(cluster, net.root, net.tiny, net.db, "rogue")
    client = net.gateway_client(url)
    assert client.completions.create(model="tiny", prompt="ab", max_tokens=1).choices
    secret = cluster.admit_gateway("rogue")
    held = cluster.routes(secret)["server"]  # a token the rogue gateway holds
    assert cluster.gateways().revoke("rogue")

    refused = httpx.get(f"{cluster.url}/v1/network/routes",
                        headers={"Authorization": f"Bearer {secret}"})  # fmt: skip
    assert (
        refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_gateway_secret"
    )

    def stopped_routing() -> bool:
        try:
            client.completions.create(model="tiny", prompt="ab", max_tokens=1)
        except openai.APIStatusError as e:
            return e.status_code in (404, 503)
        return False

    wait_until(stopped_routing, 10, what="the revoked gateway to drop its routes")
    # the node cannot know of the revocation: it refuses the held token once it expires
    expired = wait_until(lambda: direct(net, held["token"]).status_code == 401, TTL + SKEW + 10,
                         every_s=0.25, what="the revoked gateway's token refused")  # fmt: skip
    assert expired and time.time() > held["token_expires_at"]
    assert direct(net, held["token"]).json()["error"]["code"] == "expired_serving_token"
    assert net.gateway_client().completions.create(model="tiny", prompt="ab", max_tokens=1)


def test_the_gateway_keeps_serving_across_token_rotations(net: Net) -> None:
    client, edge = net.gateway_client(), net.cluster.admit_gateway("edge")
    failures: list[Exception] = []
    tokens: set[str] = set()  # the edge gateway's tokens (the coordinator's, per gateway)
    start = time.monotonic()

    def served_three_lifetimes() -> bool:
        try:
            client.completions.create(model="tiny", prompt="ab", max_tokens=1)
        except openai.APIError as e:
            failures.append(e)
        tokens.add(net.cluster.routes(edge)["server"]["token"])
        return time.monotonic() - start > 3 * (TTL + SKEW)

    wait_until(served_three_lifetimes, 90, every_s=0.1, what="three token lifetimes")
    assert not failures, failures[:3]
    assert len(tokens) >= 3  # issued again at every half-life
