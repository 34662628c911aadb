"""API keys, budgets and usage on a real database file: hashed keys, revocation, reservations
that never overspend however many requests race, settlement, and the ``bazaar keys`` commands."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.keys import KeyStore, UsageRow, open_database
from tests.conftest import REPO


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(open_database(f"sqlite:///{tmp_path / 'gateway.db'}"))


def usage(key_id: int, prompt: int, completion: int) -> UsageRow:
    return UsageRow(
        key_id=key_id, model="tiny", prompt_tokens=prompt, completion_tokens=completion,
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


def test_reservations_never_overspend_under_concurrency(store: KeyStore) -> None:
    _, key = store.create("small", budget_tokens=1000)
    granted: list[bool] = []
    lock = threading.Lock()

    def request() -> None:
        ok = store.reserve(key.id, 30)
        with lock:
            granted.append(ok)

    threads = [threading.Thread(target=request) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 1000 // 30  # exactly what fits, no more
    (after,) = store.all()
    assert after.reserved_tokens == 30 * sum(granted) <= after.budget_tokens  # type: ignore[operator]


def test_settlement_charges_what_was_used_and_records_it(store: KeyStore) -> None:
    _, key = store.create("k", budget_tokens=100)
    assert store.reserve(key.id, 60)
    assert not store.reserve(key.id, 50)  # 60 reserved + 50 > 100
    store.settle(key.id, 60, usage(key.id, 10, 15))  # used 25 of the 60 reserved
    (after,) = store.all()
    assert (after.used_tokens, after.reserved_tokens) == (25, 0)
    assert store.reserve(key.id, 75) and not store.reserve(key.id, 1)
    assert [(u.prompt_tokens, u.completion_tokens) for u in store.usage(key.id)] == [(10, 15)]
    _, free = store.create("unlimited")
    assert store.reserve(free.id, 10**9)


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
