"""The node's model process: adapters held for requests, least recently used ones unloaded;
errors back over the pipe as their own types."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from node.model.completions import CompletionJob
from node.model.errors import ContextTooLong, ModelError, ModelGone
from node.model.worker import ModelSpec, ModelWorker
from tests.lora import random_adapter
from tests.wait import await_until

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


def test_rollouts_at_an_adapter_version_are_made_and_checked_with_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    from envs import load_environment
    from node.store.adapters import AdapterStore
    from protocol.leases import Lease, SamplingParams

    env = load_environment("arith", digits=2)
    store = AdapterStore(tmp_path / "adapters")
    store.add_dir("demo", 1, random_adapter(tiny_model, tmp_path / "lora", 7))
    lease = Lease(
        lease_id="l1", run_id="demo", env_id=env.name, env_version=env.version, env_seed=3,
        example_indices=list(range(4)), group_size=2, policy_version=1,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8),
        lease_seed=b"\x05" * 32, deadline_ms=0,
    )  # fmt: skip
    assert store.newest() == {"demo": 1}
    with pytest.raises(ValueError, match="not held"):
        store.for_version("demo", 2)

    async def main() -> tuple[object, object, object]:
        worker = ModelWorker(ModelSpec("tiny", str(tiny_model.parent.parent)))
        async with trio.open_nursery() as nursery:
            assert await worker.ensure_started(nursery)
            adapter = store.for_version("demo", 1)
            payload = await worker.produce(lease, adapter)
            with_it = await worker.verify(lease, payload, 1, 2, adapter)
            with_base = await worker.verify(lease, payload, 1, 2, None)
            worker.close()
            nursery.cancel_scope.cancel()
        return payload, with_it, with_base

    payload, with_it, with_base = trio.run(main)
    assert payload.policy_version == 1  # type: ignore[attr-defined]
    assert with_it.passed, with_it  # type: ignore[attr-defined]
    assert not with_base.passed  # type: ignore[attr-defined]
    assert with_base.failed_check in ("sampling_replay", "logprobs")  # type: ignore[attr-defined]


def test_errors_cross_the_pipe_as_their_types(tiny_model: Path) -> None:
    """A prompt too long for the context raises ``ContextTooLong`` in the node, any other failure
    a plain ``ModelError`` naming its class, and the model process serves on; a model process
    that dies mid-request raises ``ModelGone``."""
    from protocol.leases import Lease, SamplingParams

    fits = CompletionJob(prompt="12+7=", max_tokens=4, temperature=0.0)
    unknown_env = Lease(
        lease_id="l1", run_id="demo", env_id="no-such-env", env_version="1", env_seed=0,
        example_indices=[0], group_size=1, policy_version=0,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=4),
        lease_seed=b"\x01" * 32, deadline_ms=0,
    )  # fmt: skip
    # seconds of generation (near-uniform sampling rarely picks the end token), so the child is
    # still at it when it is killed
    slow = CompletionJob(prompt="12+7=", max_tokens=240, n=128, temperature=100.0)

    async def main() -> dict[str, object]:
        worker = ModelWorker(ModelSpec("tiny", str(tiny_model.parent.parent)))
        seen: dict[str, object] = {}
        async with trio.open_nursery() as nursery:
            assert await worker.ensure_started(nursery)
            with pytest.raises(ContextTooLong) as too_long:
                await worker.complete(dataclasses.replace(fits, max_tokens=100_000))
            seen["too_long"] = str(too_long.value)
            with pytest.raises(ModelError) as other:
                await worker.produce(unknown_env)
            seen["other"] = (type(other.value), str(other.value))
            seen["serves_on"] = len((await worker.complete(fits)).choices) == 1

            async def request() -> None:
                try:
                    await worker.complete(slow)
                except ModelGone as e:
                    seen["gone"] = str(e)

            nursery.start_soon(request)
            # sent (the send lock is free again) and not answered
            await await_until(lambda: bool(worker._waiting) and not worker._send_lock.locked())
            worker._proc.kill()
            await await_until(lambda: "gone" in seen, 30)
            worker.close()
            nursery.cancel_scope.cancel()
        return seen

    seen = trio.run(main)
    assert "max_tokens is 100000" in str(seen["too_long"])
    assert not str(seen["too_long"]).startswith("ContextTooLong")  # the message, not a repr
    assert seen["other"][0] is ModelError, seen["other"]  # type: ignore[index]
    assert seen["serves_on"] is True
    assert "model process gone" in str(seen["gone"])


def test_a_streamed_request_arrives_token_by_token_and_a_caller_that_leaves_stops_it(
    tiny_model: Path,
) -> None:
    """Deltas come as the child generates them (their text adds up to the whole answer,
    which comes last; grammars keep the answers long enough to tell); leaving after the first
    delta ends the generation in the model process long before its budget (a grammar that
    demands 150 characters keeps it from ending sooner)."""
    from contextlib import aclosing

    from node.model.completions import CompletionResult
    from protocol.grammar import schema_grammar

    job = CompletionJob(prompt="12+7=", max_tokens=40, temperature=1.0, seed=4, n=2,
                        grammar=schema_grammar({"type": "string", "minLength": 20}))  # fmt: skip
    long = CompletionJob(
        prompt="{", max_tokens=200, seed=1,
        grammar=schema_grammar({"type": "string", "minLength": 150}),
    )  # fmt: skip

    async def main() -> dict[str, object]:
        worker = ModelWorker(ModelSpec("tiny", str(tiny_model.parent.parent)))
        seen: dict[str, object] = {}
        async with trio.open_nursery() as nursery:
            assert await worker.ensure_started(nursery)
            parts: list[object] = []
            async with aclosing(worker.stream(job)) as stream:
                async for item in stream:
                    parts.append(item)
            seen["parts"], seen["whole"] = parts, await worker.complete(job)
            async with aclosing(worker.stream(long)) as stream:
                async for _ in stream:
                    break  # the client went away after its first chunk
            await await_until(lambda: worker.cancelled, 30)
            seen["cancelled"] = worker.cancelled[-1]
            seen["after"] = (await worker.complete(job)).choices[0].text  # still serving
            worker.close()
            nursery.cancel_scope.cancel()
        return seen

    seen = trio.run(main)
    parts, whole = seen["parts"], seen["whole"]
    assert isinstance(parts, list) and isinstance(parts[-1], CompletionResult)
    assert isinstance(whole, CompletionResult) and parts[-1] == whole  # same seed, same answer
    deltas = [d for batch in parts[:-1] for d in batch]
    assert len(parts) > 10  # step by step, not one answer at the end
    for i, choice in enumerate(whole.choices):
        mine = [d for d in deltas if d.index == i]
        assert "".join(d.text for d in mine) == choice.text
        assert [t for d in mine for t in d.tokens] == choice.tokens
        assert [d.finish_reason for d in mine][-1] == choice.finish_reason
    tokens = int(str(seen["cancelled"]).split()[2])
    assert tokens < 100, seen["cancelled"]
    assert seen["after"] == whole.choices[0].text
