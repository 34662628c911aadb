"""Keeping a node's adapter store at the current versions of the runs on its base model.

The node asks the coordinator (``VersionsRequest`` over ``/bazaar/adapters/1.0.0``) which
versions are current and who holds them; for each version it lacks it checks the trainer's
signed manifest (the signature, and that the signer is one of the trainers the coordinator
names), fetches the shards from the holders (``node/shards.py``: every shard checked against
the manifest, a wrong one reported and fetched elsewhere), assembles the PEFT files into the
adapter store and serves the shards onward. Its next lease request declares the new version, so
the coordinator leases it that version's work and names it as a holder to other nodes.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from node.adapters import AdapterStore, assemble
from node.payload_store import PayloadStore
from node.shards import fetch_version, serve_shards
from protocol.adapters import AdapterManifest, VersionInfo, VersionsReply, VersionsRequest
from protocol.envelope import open_envelope
from protocol.errors import BadSignature, DecodeError, ProtocolError
from protocol.versions import protocol_id

log = logging.getLogger(__name__)
ADAPTERS_PROTOCOL = protocol_id("adapters")


class VersionSync:
    def __init__(self, agent: Any, base_model: str, adapters: AdapterStore, shards: PayloadStore):
        self.agent, self.base_model = agent, base_model
        self.adapters, self.shards = adapters, shards
        self.bad_shards: list[tuple[str, str]] = []
        """(peer, why) of every wrong shard received (reported in the log)."""
        serve_shards(agent.host, shards)

    async def sync(self) -> list[tuple[str, int]]:
        """Fetch every current version not held here; returns the ``(run, version)`` fetched."""
        try:
            reply = await self.agent.ask(
                VersionsRequest(base_model=self.base_model), (VersionsReply,), ADAPTERS_PROTOCOL
            )
        except ProtocolError as e:
            log.warning("cannot ask for adapter versions: %s", e)
            return []
        fetched = []
        log.debug("current versions: %s", [(i.run_id, i.version) for i in reply.versions])
        for info in reply.versions:
            if info.version in self.adapters.versions(info.run_id):
                continue
            try:
                await self.fetch(info)
                fetched.append((info.run_id, info.version))
            except Exception as e:  # a version that cannot be had is logged; the node goes on
                log.warning("cannot fetch %s v%d: %s", info.run_id, info.version, e)
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
        holders = [h for h in info.holders if h.peer_id != self.agent.host.peer_id]
        for h in holders:  # dial what the coordinator knows of them
            for addr in h.addrs:
                try:
                    await self.agent.host.connect(addr, timeout_s=5)
                    break
                except (OSError, ProtocolError, trio.TooSlowError):
                    continue

        def bad(peer: str, why: str) -> None:
            self.bad_shards.append((peer, why))

        shards = await fetch_version(self.agent.host, self.agent.identity, manifest, self.shards,
                                     [h.peer_id for h in holders], on_bad=bad)  # fmt: skip
        path = self.adapters.add(info.run_id, info.version, assemble(manifest, shards))
        log.info("fetched %s v%d into %s", info.run_id, info.version, path,
                 extra={"run_id": info.run_id})  # fmt: skip
