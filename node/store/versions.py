"""Keeping a node's adapter store at the versions it works with, and serving them onward.

One ``VersionSync`` per node, shared by its roles (inference, verifier, trainer, serving): one
adapter store, one shard store served on ``/bazaar/shards/1.0.0``.

- **Following.** Trainers publish each new version's signed manifest on the adapters gossip
  topic; a manifest of a version newer than any held wakes ``follow``, which asks the
  coordinator (``VersionsRequest`` over ``/bazaar/adapters/1.0.0``) for that version and who
  holds it, and fetches it; every ``period_s`` it also asks for the current versions of all
  running runs (a manifest missed) and for deployed versions (``Deployed`` on gossip, from the
  coordinator only, makes it ask at once; the store then answers model ``<run>`` with that
  version). Gossip is the prompt, the coordinator the authority: a manifest on gossip makes a
  node ask, never fetch on its word.
- **Fetching.** For each version it lacks, the node checks the trainer's signed manifest (the
  signature, and that the signer is one of the trainers the coordinator names), fetches the
  shards from the holders (``node/store/shards.py``: every shard checked against the manifest),
  assembles the PEFT files into the adapter store and serves the shards onward. The next lease
  request declares the new version, so the coordinator leases it that version's work and names
  this node as a holder to others. In-flight generations finish on the version their lease
  named: a version is a new adapter name in the model process, never an overwrite.
- **Penalties.** A peer that sent a shard that does not match the manifest is banned from this
  node's fetches for ``ban_s`` (``Penalties``); the shard is fetched elsewhere.
- **On demand.** A verifier auditing a rollout of a version it lacks fetches exactly that
  version (``ensure``).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from node.store.adapters import AdapterStore, assemble
from node.store.shards import Penalties, fetch_version, serve_shards
from protocol.adapters import (
    AdapterManifest,
    Deployed,
    VersionInfo,
    VersionsReply,
    VersionsRequest,
)
from protocol.envelope import Envelope, open_envelope
from protocol.errors import BadSignature, DecodeError, NotFound, ProtocolError
from protocol.payload_store import PayloadStore
from protocol.versions import ADAPTERS as ADAPTERS_PROTOCOL

log = logging.getLogger(__name__)


class VersionSync:
    def __init__(
        self, base_model: str, adapters: AdapterStore, shards: PayloadStore, period_s: float = 30.0
    ) -> None:
        self.base_model, self.adapters, self.shards = base_model, adapters, shards
        self.penalties = Penalties()
        self.period_s = period_s
        self.agent: Any = None
        self._heard = trio.Event()
        self._wanted: set[tuple[str, int]] = set()
        self._following = False
        self._sync_due = False
        self._lock = trio.Lock()

    def attach(self, agent: Any) -> None:
        """Serve the shard store and listen for manifests on ``agent`` (once per node)."""
        if self.agent is None:
            self.agent = agent
            serve_shards(agent.host, self.shards)
            agent.on_manifest.append(self._on_manifest)

    def _on_manifest(self, env: Envelope) -> None:
        msg = env.message
        if isinstance(msg, Deployed):
            if env.sender == self.agent.coordinator_id:  # only the coordinator deploys
                self._sync_due = True
                self._heard.set()
            return
        assert isinstance(msg, AdapterManifest)  # the gossip gate lets nothing else through
        held = self.adapters.versions(msg.run_id)
        if (not held or msg.version > held[-1]) and len(self._wanted) < 64:
            self._wanted.add((msg.run_id, msg.version))
            self._heard.set()

    async def follow(self) -> None:
        """Fetch each new version heard of on gossip at once (if the coordinator has recorded
        it), and sync with the coordinator every ``period_s`` anyway (current and deployed
        versions). One loop per node, however many roles start it."""
        if self._following:
            return
        self._following = True
        await self.sync()
        while True:
            with trio.move_on_after(self.period_s):
                await self._heard.wait()
            self._heard = trio.Event()
            wanted, self._wanted = self._wanted, set()
            for run_id, version in sorted(wanted):
                await self.ensure(run_id, version)
            if not wanted or self._sync_due:
                self._sync_due = False
                await self.sync()

    async def sync(self) -> list[tuple[str, int]]:
        """Fetch every current version not held here; returns the ``(run, version)`` fetched."""
        return await self._fetch_all(VersionsRequest(base_model=self.base_model))

    async def ensure(self, run_id: str, version: int) -> bool:
        """Hold ``version`` of ``run_id`` (fetched if need be); False if it cannot be had."""
        if version == 0 or version in self.adapters.versions(run_id):
            return True
        request = VersionsRequest(base_model=self.base_model, run_id=run_id, version=version)
        return (run_id, version) in await self._fetch_all(request)

    async def _fetch_all(self, request: VersionsRequest) -> list[tuple[str, int]]:
        async with self._lock:  # one fetch of a version at a time, whoever asks
            try:
                reply = await self.agent.ask(request, (VersionsReply,), ADAPTERS_PROTOCOL)
            except ProtocolError as e:
                log.warning("cannot ask for adapter versions: %s", e)
                return []
            fetched = []
            for info in [*reply.versions, *reply.deployed]:
                if info.version in self.adapters.versions(info.run_id):
                    continue
                try:
                    await self.fetch(info)
                    fetched.append((info.run_id, info.version))
                except Exception as e:  # a version that cannot be had is logged; the node goes on
                    log.warning("cannot fetch %s v%d: %s", info.run_id, info.version, e)
            for run_id, current in reply.current.items():
                if dropped := self.adapters.withdraw(run_id, current):
                    log.warning("%s is back at v%d: dropped the withdrawn versions %s", run_id,
                                current, dropped, extra={"run_id": run_id})  # fmt: skip
            for info in reply.deployed:
                if self.adapters.deployed(info.run_id) != info.version:
                    self.adapters.set_deployed(info.run_id, info.version)
                    log.info("%s now serves v%d (deployed)", info.run_id, info.version,
                             extra={"run_id": info.run_id})  # fmt: skip
            return fetched

    async def fetch(self, info: VersionInfo) -> None:
        env = open_envelope(info.manifest, None)  # a stored frame: signature, no replay window
        manifest = env.message
        seeds = [h.peer_id for h in info.holders[: info.seeds]]
        if not isinstance(manifest, AdapterManifest):
            raise DecodeError("a version's manifest must be an AdapterManifest")
        if env.sender not in seeds:
            raise BadSignature(f"the manifest of {info.run_id} v{info.version} is not a trainer's")
        if (manifest.run_id, manifest.version) != (info.run_id, info.version):
            raise DecodeError("the manifest names another version than the coordinator")
        me = self.agent.host.peer_id
        holders = [h for h in info.holders if h.peer_id != me]
        usable = [h for h in holders if not self.penalties.banned(h.peer_id)]
        if not usable:
            raise NotFound(f"no holder of {info.run_id} v{info.version} this node trusts")
        for h in usable:  # dial what the coordinator knows of them
            await self.agent.host.connect_any(list(h.addrs))
        seeds = [h.peer_id for h in usable]
        host, identity = self.agent.host, self.agent.identity
        shards = await fetch_version(
            host, identity, manifest, self.shards, seeds, penalties=self.penalties
        )
        path = self.adapters.add(info.run_id, info.version, assemble(manifest, shards))
        log.info("fetched %s v%d into %s", info.run_id, info.version, path,
                 extra={"run_id": info.run_id})  # fmt: skip
