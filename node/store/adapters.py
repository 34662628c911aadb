"""The adapter versions a node holds, on disk in PEFT format, and the model names they serve.

An adapter version lives at ``<data dir>/adapters/<run id>/<version>/`` as PEFT writes it
(``adapter_config.json`` + ``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained``
loads it as it is. A version is written into a temporary directory next to its place and renamed
into it, so a reader sees a whole version or none.

Model names: the base model by its own name; ``<run>`` for the newest version held of a run;
``<run>@<version>`` for a pinned one. In the model process each version is loaded under its own
name (``<run>@<version>``), so a new version is added beside the one in use and generations in
flight finish on the version they started with.

Shards: a version travels as one ``AdapterBundle`` (its two files) cut into content-addressed
shards of ``SHARD_BYTES``; ``cut`` makes them with their ``ShardInfo`` list, ``assemble`` checks
every shard against the manifest's hash and size (a wrong one raises ``HashMismatch`` naming it,
so its sender can be penalized) and decodes the bundle strictly.

>>> parse_model_name("arith-1@3"), parse_model_name("arith-1"), parse_model_name("a@b")
(('arith-1', 3), ('arith-1', None), None)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from protocol.adapters import AdapterBundle, AdapterManifest, ShardInfo
from protocol.errors import HashMismatch

_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FILES = ("adapter_config.json", "adapter_model.safetensors")
SHARD_BYTES = 1 << 20
"""Shard size: small enough that a node fetches different shards from different peers at once."""


def parse_model_name(name: str) -> tuple[str, int | None] | None:
    """``(run, version or None)`` for an adapter name, None if it cannot be one."""
    run, at, version = name.partition("@")
    if not _RUN.match(run) or (at and not version.isdigit()):
        return None
    return run, int(version) if at else None


def adapter_name(run_id: str, version: int) -> str:
    return f"{run_id}@{version}"


def cut(
    files: dict[str, bytes], shard_bytes: int = SHARD_BYTES
) -> tuple[list[ShardInfo], list[bytes]]:
    """A version's files as shards: ``(their infos, for the manifest; their bytes)``."""
    data = AdapterBundle(config_json=files[FILES[0]], weights=files[FILES[1]]).encode()
    shards = [data[i : i + shard_bytes] for i in range(0, len(data), shard_bytes)]
    return [ShardInfo(hashlib.sha256(b).digest(), len(b)) for b in shards], shards


def check_shard(info: ShardInfo, data: bytes) -> None:
    """``HashMismatch`` unless ``data`` is the shard ``info`` names."""
    if len(data) != info.size or hashlib.sha256(data).digest() != info.sha256:
        raise HashMismatch(
            f"shard {info.sha256.hex()[:16]} has {len(data)} bytes hashing to "
            f"{hashlib.sha256(data).hexdigest()[:16]}, not {info.size} bytes of its hash"
        )


def assemble(manifest: AdapterManifest, shards: dict[bytes, bytes]) -> dict[str, bytes]:
    """The files of a version from its shards (by hash), each checked; ``HashMismatch`` for a
    wrong shard, ``KeyError`` for a missing one, ``DecodeError`` for a bad bundle."""
    parts = []
    for info in manifest.shards:
        check_shard(info, shards[info.sha256])
        parts.append(shards[info.sha256])
    bundle = AdapterBundle.decode(b"".join(parts))
    return {FILES[0]: bundle.config_json, FILES[1]: bundle.weights}


DEPLOYED = "deployed"
"""Per run: the version ``<run>`` names (written when a node hears of a deployment)."""


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, run_id: str, version: int) -> Path:
        return self.root / run_id / str(version)

    def versions(self, run_id: str) -> list[int]:
        """The versions held of ``run_id``, oldest first."""
        d = self.root / run_id
        if not _RUN.match(run_id) or not d.is_dir():
            return []
        return sorted(
            int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / FILES[1]).is_file()
        )

    def runs(self) -> dict[str, list[int]]:
        if not self.root.is_dir():
            return {}
        held = {p.name: self.versions(p.name) for p in sorted(self.root.iterdir()) if p.is_dir()}
        return {run: versions for run, versions in held.items() if versions}

    def model_names(self) -> list[str]:
        """Every name this store serves: ``<run>`` and each ``<run>@<version>``."""
        names = []
        for run, versions in self.runs().items():
            names.append(run)
            names += [adapter_name(run, v) for v in versions]
        return names

    def resolve(self, model: str) -> tuple[str, int] | None:
        """The ``(run, version)`` a model name selects here, or None: ``<run>`` is the deployed
        version (``bazaar run deploy``) once this node holds it, else the newest held."""
        parsed = parse_model_name(model)
        if parsed is None:
            return None
        run, version = parsed
        held = self.versions(run)
        if version is None:
            deployed = self.deployed(run)
            if deployed in held:
                return run, deployed
            return (run, held[-1]) if held else None
        return (run, version) if version in held else None

    def withdraw(self, run_id: str, above: int) -> list[int]:
        """Drop the versions of ``run_id`` newer than ``above`` (the run was rolled back);
        returns those dropped."""
        dropped = [v for v in self.versions(run_id) if v > above]
        for v in dropped:
            shutil.rmtree(self.path(run_id, v), ignore_errors=True)
        return dropped

    def deployed(self, run_id: str) -> int | None:
        """The run's deployed version, as this node last heard it."""
        try:
            return int((self.root / run_id / DEPLOYED).read_text())
        except (OSError, ValueError):
            return None

    def set_deployed(self, run_id: str, version: int) -> None:
        if not _RUN.match(run_id):
            raise ValueError(f"not a run id: {run_id!r}")
        path = self.root / run_id / DEPLOYED
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(version))
        tmp.replace(path)

    def for_version(self, run_id: str, version: int) -> tuple[str, str] | None:
        """What the model process needs to sample or verify at ``version`` of a run: ``(name,
        path)`` of the adapter, None for version 0 (the base model); ``ValueError`` if this
        node does not hold it."""
        if version == 0:
            return None
        if version not in self.versions(run_id):
            raise ValueError(f"adapter version {version} of {run_id} is not held here")
        return adapter_name(run_id, version), str(self.path(run_id, version))

    def newest(self) -> dict[str, int]:
        """The newest version held of each run (what a lease request declares)."""
        return {run: versions[-1] for run, versions in self.runs().items()}

    def add(self, run_id: str, version: int, files: dict[str, bytes]) -> Path:
        """Write a version atomically (temporary directory, then rename); returns its path."""
        if not _RUN.match(run_id) or set(files) != set(FILES):
            raise ValueError(f"an adapter is {FILES} of a run id like 'arith-1', got {run_id!r}")
        final = self.path(run_id, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".incoming-"))
        try:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            if final.exists():  # versions never change: the one already here is the same
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def add_dir(self, run_id: str, version: int, source: Path) -> Path:
        """Copy a PEFT directory (as ``save_pretrained`` wrote it) in as a version."""
        return self.add(run_id, version, read_files(source))


def read_files(source: Path) -> dict[str, bytes]:
    return {f: (source / f).read_bytes() for f in FILES}
