"""Deploying an adapter version: ``bazaar run deploy RUN@V`` makes a serving node (a real
process) fetch that version and answer model ``RUN`` with it; deploying again moves ``RUN`` to
another version at once (the coordinator's ``Deployed`` on gossip); a version that was never
made cannot be deployed. Versions come from an in-process trainer peer (signed manifests, shards
served over py-libp2p)."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import trio

from node.store.adapters import cut, read_files
from protocol.adapters import AdapterManifest, ManifestAck
from protocol.identity import Identity
from protocol.payload_store import PayloadStore
from protocol.payloads import serve_payloads
from tests.integration.cluster import Cluster
from tests.integration.peer import peer
from tests.integration.rounds import NO_REPLAYS, dealt_round
from tests.integration.test_run_commands import bazaar
from tests.integration.test_versions import ADAPTERS
from tests.lora import random_adapter
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(240)


def test_deploy_serves_a_version_as_the_runs_model(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = Cluster(tmp_path, interval_s=1.0)
    files = {v: read_files(random_adapter(tiny_model, tmp_path / f"lora{v}", seed=20 + v))
             for v in (1, 2)}  # fmt: skip
    try:
        cluster.start_coordinator(extra=["--leases.round_leases=1", *NO_REPLAYS])
        monkeypatch.setenv("BAZAAR_API_KEY", cluster.api_key)  # the CLI bills runs to it
        spec = {"name": "r1", "rl": {"max_examples": 8, "prompts_per_lease": 2, "group_size": 2},
                "verification": {"trusted_only": False}}  # fmt: skip
        cluster.api("POST", "/v1/runs", json=spec)
        url = ["--coordinator-url", cluster.url]

        async def main() -> None:
            async with (
                peer(cluster.multiaddr, Identity.generate()) as trainer,
                peer(cluster.multiaddr) as producer,
            ):
                await trainer.join(["trainer"], "trainer")
                await producer.join(["inference"], "producer")
                payloads = PayloadStore(tmp_path / "producer")
                serve_payloads(producer.host, payloads)
                store = PayloadStore(tmp_path / "trainer-shards")
                trainer.serve_shards(store)
                for v in (1, 2):
                    await dealt_round(cluster, producer, payloads, [trainer])
                    infos, shards = cut(files[v], shard_bytes=16384)
                    for s in shards:
                        store.put(s)
                    m = AdapterManifest(run_id="r1", version=v, parent_version=v - 1,
                                        base_model_hash=bytes(32), shards=infos,
                                        total_bytes=sum(i.size for i in infos))  # fmt: skip
                    ack = await trainer.ask(ADAPTERS, m)
                    assert isinstance(ack, ManifestAck) and ack.outcome == "recorded"
                await trio.to_thread.run_sync(serve_and_deploy)

        def serve_and_deploy() -> None:
            extra = [f"--model_cache={tiny_model.parent.parent}", "--serve", "--torch_threads=1"]
            node = cluster.start_node("server", roles="verifier", extra=extra)
            route = wait_until(lambda: cluster.routes().get("server"), 60, what="serving")
            serving = route["url"]
            wait_until(lambda: httpx.get(f"{serving}/health").is_success, 90, what="model loaded")
            pointer = node.home / "adapters" / "r1" / "deployed"
            client = openai.OpenAI(base_url=f"{serving}/v1", api_key=route["token"],
                                   max_retries=0)  # fmt: skip

            def answer(model: str) -> str:
                done = client.completions.create(model=model, prompt="12+7=", max_tokens=8,
                                                  temperature=0)  # fmt: skip
                return done.choices[0].text

            def served(version: int) -> bool:
                held = (node.home / "adapters" / "r1" / str(version)).is_dir()
                return held and pointer.exists() and pointer.read_text() == str(version)

            deployed = bazaar("run", "deploy", "r1@1", *url)
            assert deployed.returncode == 0 and "version 1" in deployed.stdout, deployed.stderr
            wait_until(lambda: served(1), 20, what="v1 fetched and deployed on the node")
            wait_until(lambda: "r1@2" in [m.id for m in client.models.list().data], 30)
            v1, v2 = answer("r1@1"), answer("r1@2")
            assert v1 != v2  # the two versions' weights answer differently
            assert answer("r1") == v1  # the deployed one, though v2 is newer
            again = bazaar("run", "deploy", "r1", *url)  # the run's current version: 2
            assert again.returncode == 0 and "version 2" in again.stdout
            wait_until(lambda: served(2), 10, what="the deployment moved on gossip")
            assert answer("r1") == v2
            assert cluster.api("GET", "/v1/runs/r1")["deployed"] == 2
            never = bazaar("run", "deploy", "r1@7", *url)
            assert never.returncode == 2 and "no adapter version 7" in never.stderr

        trio.run(main)
    finally:
        cluster.stop_all()
