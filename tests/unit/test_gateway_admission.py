"""Admitted gateways (``coordinator/gateways.py``) on a real database file: secrets stored
hashed, revoked, replaced; routes that list live serving nodes only, each with a serving token
issued again at half-life; and the ``bazaar gateway admit | revoke | list`` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.db import open_database
from coordinator.gateways import Gateways, GatewayStore
from coordinator.membership import NodeState
from protocol import serving_tokens
from protocol.identity import Identity
from protocol.membership import Capabilities
from tests.conftest import REPO

COORDINATOR, NODE, OTHER = Identity.generate(), Identity.generate(), Identity.generate()


@pytest.fixture
def gateways(tmp_path: Path) -> GatewayStore:
    return GatewayStore(open_database(f"sqlite:///{tmp_path / 'coordinator.db'}"))


def test_gateway_secrets_are_stored_hashed_revoked_and_replaced(
    gateways: GatewayStore, tmp_path: Path
) -> None:
    secret, row = gateways.admit("gw-1")
    assert secret.startswith("bzg-") and row.revoked_at is None
    assert secret.encode() not in (tmp_path / "coordinator.db").read_bytes()
    assert gateways.authenticate(secret) == "gw-1"
    for wrong in ("", "bzg-", secret[:-1] + ("A" if secret[-1] != "A" else "B"), "bz-x"):
        assert gateways.authenticate(wrong) is None
    with pytest.raises(ValueError, match="--replace"):
        gateways.admit("gw-1")
    new, _ = gateways.admit("gw-1", replace=True)
    assert gateways.authenticate(secret) is None and gateways.authenticate(new) == "gw-1"
    assert gateways.revoke("gw-1") and gateways.authenticate(new) is None
    assert not gateways.revoke("gw-1") and not gateways.revoke("nope")
    back, _ = gateways.admit("gw-1")  # a revoked name may be admitted again
    assert gateways.authenticate(back) == "gw-1"
    assert [(g.name, g.revoked_at) for g in gateways.all()] == [("gw-1", None)]


def node(peer: Identity, name: str, url: str = "", status: str = "alive") -> NodeState:
    caps = Capabilities(roles=["inference"], devices=[], ram_bytes=0, cpu_count=1,
                        torch_version="", backends=[], software_version="0",
                        serving_url=url, serving_models=["tiny"] if url else [])  # fmt: skip
    return NodeState(peer.peer_id, name, "i" * 8, caps, [], "1.0", status, 0.0, 0.0)  # type: ignore[arg-type]


def test_routes_list_live_serving_nodes_with_tokens_issued_again_at_half_life(
    gateways: GatewayStore,
) -> None:
    now = [1000.0]
    issuer = Gateways(gateways, COORDINATOR, ttl_s=60.0, clock=lambda: now[0])
    nodes = [node(NODE, "a", "http://a"), node(OTHER, "b"), node(Identity.generate(), "c",
             "http://c", status="dead")]  # fmt: skip
    (route,) = issuer.routes("gw", nodes)
    assert (route["name"], route["url"], route["models"]) == ("a", "http://a", ["tiny"])
    fields = serving_tokens.verify(
        route["token"], COORDINATOR.public_bytes, NODE.peer_id, now=now[0]
    )
    assert fields.gateway == "gw" and route["token_expires_at"] == 1060.0
    now[0] = 1029.0
    assert issuer.routes("gw", nodes)[0]["token"] == route["token"]  # under half its life
    now[0] = 1030.5
    rotated = issuer.routes("gw", nodes)[0]
    assert rotated["token"] != route["token"] and rotated["token_expires_at"] == 1090.5
    other = issuer.routes("gw-2", nodes)[0]  # each gateway its own tokens
    assert serving_tokens.decode(other["token"])[0].gateway == "gw-2"


def bazaar(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BAZAAR_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "bazaar", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=60)  # fmt: skip


def test_the_gateway_commands_admit_list_and_revoke(home: Path) -> None:
    admitted = bazaar(home, "gateway", "admit", "edge-1")
    assert admitted.returncode == 0, admitted.stderr
    secret = admitted.stdout.strip()  # alone on stdout
    assert secret.startswith("bzg-") and "not shown again" in admitted.stderr
    store = GatewayStore(open_database(f"sqlite:///{home / 'coordinator.db'}"))
    assert store.authenticate(secret) == "edge-1"  # the coordinator's own database
    twice = bazaar(home, "gateway", "admit", "edge-1")
    assert twice.returncode == 2 and "--replace" in twice.stderr
    listed = json.loads(bazaar(home, "gateway", "list", "--json").stdout)
    assert [(g["name"], g["revoked_at"]) for g in listed] == [("edge-1", None)]
    assert secret not in json.dumps(listed)
    assert bazaar(home, "gateway", "revoke", "edge-1").returncode == 0
    assert store.authenticate(secret) is None
    again = bazaar(home, "gateway", "revoke", "edge-1")
    assert again.returncode == 2 and "no admitted gateway" in again.stderr


def test_a_gateway_without_a_secret_does_not_start(home: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BAZAAR_GATEWAY_SECRET"}
    url = ["--coordinator-url", "http://127.0.0.1:1"]  # never reached: the secret comes first
    for extra, expect in (([], "bazaar gateway admit NAME"),
                          ([f"--secret_file={tmp_path / 'missing'}"], "secret_file")):  # fmt: skip
        out = subprocess.run([sys.executable, "-m", "bazaar", "gateway", "start", *url, *extra],
                             cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={**env, "BAZAAR_HOME": str(home)})  # fmt: skip
        assert out.returncode == 2 and expect in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
