"""The content-addressed payload store: idempotent, durable, bounded in age and size, pins
kept."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from protocol.payload_store import PayloadStore


def test_put_get_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = PayloadStore(tmp_path)
    digest = store.put(b"frame-1", now=100.0)
    assert digest == hashlib.sha256(b"frame-1").digest()
    assert store.put(b"frame-1", now=200.0) == digest and len(store) == 1
    assert store.get(digest) == b"frame-1" and digest in store
    assert store.get(hashlib.sha256(b"other").digest()) is None


def test_a_restarted_store_finds_its_payloads(tmp_path: Path) -> None:
    digest = PayloadStore(tmp_path).put(b"kept across restarts")
    again = PayloadStore(tmp_path)
    assert again.get(digest) == b"kept across restarts" and again.total_bytes == 20


def test_retention_and_size_cap_evict_oldest_first(tmp_path: Path) -> None:
    store = PayloadStore(tmp_path, max_bytes=30, retention_s=100.0)
    a = store.put(b"a" * 10, now=0.0)
    b = store.put(b"b" * 10, now=1.0)
    c = store.put(b"c" * 10, now=2.0)
    assert len(store) == 3
    d = store.put(b"d" * 10, now=3.0)  # over 30 bytes: the oldest goes
    assert a not in store and all(k in store for k in (b, c, d))
    assert not (tmp_path / a.hex()[:2] / a.hex()).exists()
    assert store.evict(now=102.5) == 2  # b and c are past retention, d is not
    assert d in store and len(store) == 1


def test_pinned_payloads_outlive_retention_and_the_size_cap(tmp_path: Path) -> None:
    """The coordinator pins its known answers' payloads: they never leave."""
    store = PayloadStore(tmp_path, max_bytes=30, retention_s=100.0)
    a = store.put(b"a" * 10, now=0.0)
    store.pinned = {a}
    b = store.put(b"b" * 10, now=1.0)
    store.put(b"c" * 10, now=2.0)
    store.put(b"d" * 10, now=3.0)  # over 30 bytes: the oldest unpinned goes
    assert a in store and b not in store and len(store) == 3
    store.evict(now=1000.0)  # all past retention: only the pinned one stays
    assert a in store and len(store) == 1
    store.pinned = set()
    assert store.evict(now=1000.0) == 1 and a not in store


def test_bad_settings_and_oversized_payloads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        PayloadStore(tmp_path, max_bytes=0)
    with pytest.raises(ValueError, match="larger than the whole store"):
        PayloadStore(tmp_path, max_bytes=5).put(b"123456")
