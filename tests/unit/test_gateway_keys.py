"""API keys, budgets and usage on a real database file: hashed keys, revocation, holds and
in-memory reservations that never overspend however many requests (and gateways) race,
settlement, holds given back, and the ``bazaar keys`` commands."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from gateway.budgets import Ledger
from protocol.accounts import Bill, KeyStore, open_database
from tests.conftest import REPO


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(open_database(f"sqlite:///{tmp_path / 'gateway.db'}"))


def usage(key_id: int, prompt: int, completion: int, charged: int = 0) -> Bill:
    return Bill(
        key_id=key_id, charged=charged, model="tiny", prompt_tokens=prompt,
        completion_tokens=completion,
        latency_ms=1.0, node="n", status=200, created_at=time.time(),
    )  # fmt: skip


def test_keys_are_stored_hashed_and_checked(store: KeyStore, tmp_path: Path) -> None:
    secret, key = store.create("app", budget_tokens=100)
    assert secret.startswith("bz-") and len(secret) > 40
    raw = (tmp_path / "gateway.db").read_bytes()
    assert secret.encode() not in raw  # only its hash is stored
    assert store.authenticate(secret) == key
    for wrong in ("", "bz-", secret[:-1] + ("A" if secret[-1] != "A" else "B"), "sk-" + secret):
        assert store.authenticate(wrong) is None
    with pytest.raises(ValueError, match="already exists"):
        store.create("app")
    assert store.revoke("app") and store.authenticate(secret) is None
    assert not store.revoke("nope")


def test_holds_never_overspend_under_concurrency(store: KeyStore) -> None:
    _, key = store.create("small", budget_tokens=1000)
    granted: list[bool] = []
    lock = threading.Lock()

    def request(i: int) -> None:
        ok = store.hold(f"gw{i % 2}", key.id, 30)  # two gateways' holds racing
        with lock:
            granted.append(ok)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 1000 // 30  # exactly what fits, no more
    (after,) = store.all()
    assert after.reserved_tokens == 30 * sum(granted) <= after.budget_tokens  # type: ignore[operator]
    assert sum(store.holds("gw0").values()) + sum(store.holds("gw1").values()) == 30 * sum(granted)


def test_settlement_charges_the_hold_and_a_restart_gives_holds_back(store: KeyStore) -> None:
    _, key = store.create("k", budget_tokens=100)
    assert store.hold("gw", key.id, 60)
    assert not store.hold("other", key.id, 50)  # 60 held + 50 > 100
    store.settle("gw", usage(key.id, 10, 15, charged=25))  # 25 of the 60 held were used
    (after,) = store.all()
    assert (after.used_tokens, after.reserved_tokens) == (25, 35)
    assert store.holds("gw") == {key.id: 35}
    assert store.hold("other", key.id, 40) and not store.hold("other", key.id, 1)
    store.release("other", key.id, 40)
    assert store.release_all("gw") == 35  # what a restarted "gw" gives back
    (after,) = store.all()
    assert (after.used_tokens, after.reserved_tokens) == (25, 0) and store.holds("gw") == {}
    assert [(u.prompt_tokens, u.completion_tokens) for u in store.usage(key.id)] == [(10, 15)]
    _, free = store.create("unlimited")
    assert store.hold("gw", free.id, 10**9)


@pytest.mark.parametrize("block", [1, 64, 8192])
def test_ledger_reserves_in_memory_and_never_overspends(store: KeyStore, block: int) -> None:
    _, key = store.create("small", budget_tokens=1000)
    ledgers = [Ledger(store, name, block_tokens=block, idle_s=0.01) for name in ("a", "b")]
    granted: list[int] = []

    async def request(ledger: Ledger, used: int) -> None:
        if await ledger.reserve(key, 30):
            granted.append(30)
            await anyio.sleep(0)  # in flight while the others race
            charged = ledger.settle(key, 30, used)
            store.settle(ledger.gateway, usage(key.id, used, 0, charged))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(request, ledgers[i % 2], 30 if i % 3 else 10)
        for ledger in ledgers:
            await ledger.give_back(everything=True)

    anyio.run(main)
    (after,) = store.all()
    assert after.used_tokens <= 1000 and after.reserved_tokens == 0
    assert after.used_tokens == sum(u.prompt_tokens for u in store.usage(key.id))
    assert len(granted) >= 1000 // 30 - 1  # at most one request lost to two holds' remainders
    assert store.holds("a") == store.holds("b") == {}


def test_keys_commands(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'g.db'}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bazaar", "keys", *args, "--db", db],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip

    made = run("create", "--name", "app", "--budget-tokens", "500", "--rpm", "60")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("bz-")
    listed = json.loads(run("list", "--json").stdout)
    assert listed[0]["name"] == "app" and listed[0]["budget_tokens"] == 500
    assert secret not in run("list").stdout
    again = run("create", "--name", "app")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert run("revoke", "app").returncode == 0
    assert run("revoke", "nope").returncode == 2
    rows = sqlite3.connect(tmp_path / "g.db").execute("select revoked from api_keys").fetchall()
    assert rows == [(1,)]
