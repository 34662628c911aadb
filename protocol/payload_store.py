"""The producer's content-addressed store of rollout payloads.

A payload is kept as the exact signed frame the node produced, under its SHA-256, so whoever
fetches it can check both that it is what the receipt named (the hash) and who made it (the
signature). Files live in ``<data dir>/payloads/<2 hex>/<64 hex>``, written atomically. Old
payloads leave after ``retention_s``, and the oldest leave first whenever the store is over
``max_bytes``: a producer must keep payloads long enough for audits and training, and no longer.
Payloads in ``pinned`` never leave (the coordinator's known answers); they count towards the cap.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path


class PayloadStore:
    def __init__(self, root: Path, max_bytes: int = 1 << 30, retention_s: float = 6 * 3600):
        if max_bytes <= 0 or retention_s <= 0:
            raise ValueError("payload store: max_bytes and retention_s must be positive")
        self.root = root
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self._index: dict[bytes, tuple[float, int]] = {}  # digest -> (stored at, size)
        self.pinned: set[bytes] = set()
        """Digests never evicted, whatever their age (the owner keeps the set small)."""
        root.mkdir(parents=True, exist_ok=True)
        for path in root.glob("*/*"):
            if len(path.name) == 64 and not path.name.endswith(".tmp"):
                st = path.stat()
                self._index[bytes.fromhex(path.name)] = (st.st_mtime, st.st_size)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self._index.values())

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._index

    def _path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / name[:2] / name

    def put(self, frame: bytes, now: float | None = None) -> bytes:
        """Store a frame (idempotent); returns its SHA-256 digest."""
        if len(frame) > self.max_bytes:
            raise ValueError(f"payload of {len(frame)} bytes is larger than the whole store")
        digest = hashlib.sha256(frame).digest()
        if digest not in self._index:
            path = self._path(digest)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(frame)
            os.replace(tmp, path)
            self._index[digest] = (time.time() if now is None else now, len(frame))
        self.evict(now)
        return digest

    def get(self, digest: bytes) -> bytes | None:
        """The frame stored under ``digest``, as it is on disk now (the caller checks the hash)."""
        if digest not in self._index:
            return None
        try:
            return self._path(digest).read_bytes()
        except FileNotFoundError:
            del self._index[digest]
            return None

    def evict(self, now: float | None = None) -> int:
        """Drop expired payloads, then the oldest while over the size cap, never a pinned one;
        returns how many."""
        now = time.time() if now is None else now
        by_age = sorted(self._index.items(), key=lambda kv: kv[1][0])
        total, dropped = self.total_bytes, 0
        for digest, (stored, size) in by_age:
            if now - stored <= self.retention_s and total <= self.max_bytes:
                break
            if digest in self.pinned:
                continue
            self._path(digest).unlink(missing_ok=True)
            del self._index[digest]
            total -= size
            dropped += 1
        return dropped
