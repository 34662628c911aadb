"""The node's model process: adapters held for requests, least recently used ones unloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.completions import CompletionJob
from node.model_worker import ModelSpec, ModelWorker
from tests.lora import random_adapter

pytestmark = pytest.mark.timeout(180)


def test_adapters_load_once_and_the_least_recently_used_idle_one_leaves(
    tiny_model: Path, tmp_path: Path
) -> None:
    paths = {f"run@{v}": str(random_adapter(tiny_model, tmp_path / str(v), v)) for v in (1, 2, 3)}
    job = CompletionJob(prompt="12+7=", max_tokens=6, temperature=0.0)

    async def main() -> dict[str, object]:
        worker = ModelWorker(ModelSpec("tiny", str(tiny_model.parent.parent)), max_adapters=2)
        seen: dict[str, object] = {}
        async with trio.open_nursery() as nursery:
            assert await worker.ensure_started(nursery)
            seen["base"] = (await worker.complete(job)).choices[0].text
            async with worker.using("run@1", paths["run@1"]):  # held while the others come
                for name in ("run@2", "run@3"):
                    async with worker.using(name, paths[name]):
                        seen[name] = (await worker.complete(job.with_adapter(name))).choices[0].text
                # three loaded: run@1 is in use, so the idle run@2 went instead
                seen["held"] = worker.loaded_adapters()
                seen["run@1"] = (await worker.complete(job.with_adapter("run@1"))).choices[0].text
            async with worker.using("run@2", paths["run@2"]):  # loads again, as it was
                again = (await worker.complete(job.with_adapter("run@2"))).choices[0].text
                seen["again"] = again == seen["run@2"]
            seen["after"] = worker.loaded_adapters()
            worker.close()
            nursery.cancel_scope.cancel()
        return seen

    seen = trio.run(main)
    assert seen["held"] == ["run@1", "run@3"]
    assert seen["after"] == ["run@3", "run@2"]  # run@1 was the least recently used idle one
    assert seen["again"] is True
    assert len({seen["base"], seen["run@1"], seen["run@2"], seen["run@3"]}) == 4
