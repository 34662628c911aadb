"""A run's lifecycle: created (or queued beyond ``max_running_runs``), running, then completed,
cancelled or failed; the oldest queued run starts when one ends. Deploying a version serves it
as model ``<run>``.

Called by the REST API (create, deploy, cancel) and by the other protocols' handlers when a run
reaches a stop rule (its last example delivered, its last round, its budget, its target reward).
"""

from __future__ import annotations

import logging

import trio

from coordinator.db import RunState
from coordinator.runs import plan_run
from coordinator.state import State
from envs import load_environment
from protocol.accounts import ApiKey
from protocol.runs import RunSpec

log = logging.getLogger(__name__)


class RunLifecycle:
    def __init__(self, state: State) -> None:
        self.state = state

    def resume(self) -> None:
        """After a restart: a run whose environment cannot load any more (a task library
        uninstalled since, say) fails instead of being leased."""
        for run in self.state.book.runs.values():
            if run.state in ("queued", "running"):
                try:
                    load_environment(run.plan.env)
                except ValueError as e:
                    run.state, run.stop_reason = "failed", f"environment: {e}"[:200]
                    log.error("run %s failed: %s", run.run_id, run.stop_reason,
                              extra={"run_id": run.run_id})  # fmt: skip
        self.state.commit()

    async def create(self, spec: RunSpec, owner: ApiKey | None = None) -> RunState:
        """Add a run, billed to ``owner``; ``ValueError`` for a bad spec or a taken run id.
        Beyond ``max_running_runs`` it waits, ``queued``."""
        book = self.state.book
        if spec.name and spec.name in book.runs:
            raise ValueError(f"run {spec.name!r} already exists")
        if spec.stop.target_reward is not None and not self.state.can_score(spec.base_model):
            raise ValueError(
                "stop.target_reward is decided on rewards the coordinator recomputes, and it "
                f"has no tokenizer for {spec.base_model!r}: start it with "
                f"--tokenizers.{spec.base_model}=PATH"
            )
        plan = await trio.to_thread.run_sync(plan_run, spec)  # may import a task library
        full = self._running() >= self.state.config.max_running_runs
        run = book.add_run(plan, "queued" if full else "running")
        if owner is not None:
            run.owner, run.owner_key_id = owner.name, owner.id
        self.state.commit()
        log.info(
            "run %s %s: %s, %s examples x %d samples on %s, billed to %s",
            plan.run_id, "created" if run.state == "running" else "queued", plan.env,
            plan.spec.rl.max_examples or "unlimited", plan.spec.rl.group_size, plan.spec.base_model,
            run.owner or "no one", extra={"run_id": plan.run_id},
        )  # fmt: skip
        return run

    def _running(self) -> int:
        return sum(r.state == "running" for r in self.state.book.runs.values())

    async def finish(self, run: RunState, state: str, reason: str) -> None:
        """A run stops (``completed`` for ``reason``, ``cancelled``, ``failed``): no more
        leases or rounds; the oldest queued run starts."""
        if run.state not in ("queued", "running"):
            return
        run.state, run.stop_reason = state, reason
        await self.ended(run)

    async def reopen(self, run: RunState) -> None:
        """A run that completed on its last round runs again (queued if the running runs are
        full): a rollback withdrew versions it counted."""
        if run.state != "completed" or run.stop_reason != "max_rounds":
            return
        full = self._running() >= self.state.config.max_running_runs
        run.state, run.stop_reason = ("queued" if full else "running"), ""
        self.state.commit()
        log.warning("run %s %s again: a rollback withdrew versions of its last rounds",
                    run.run_id, run.state, extra={"run_id": run.run_id})  # fmt: skip

    async def ended(self, run: RunState) -> None:
        """Close a run that has just stopped: give back what its rounds held, start the
        oldest queued runs that now fit."""
        billing, replays = self.state.billing, self.state.replays
        await billing.close_reported(run)
        await billing.close_unmade(
            run, lambda v, t: replays.committed(run.run_id, v, t) is not None
        )
        started = []
        running = self._running()
        queued = [r for r in self.state.book.runs.values() if r.state == "queued"]
        for waiting in sorted(queued, key=lambda r: r.created_at):
            if running >= self.state.config.max_running_runs:
                break
            waiting.state, running = "running", running + 1
            started.append(waiting)
        self.state.commit()
        log.info("run %s %s (%s)", run.run_id, run.state, run.stop_reason,
                 extra={"run_id": run.run_id})  # fmt: skip
        for r in started:
            log.info("run %s starts (was queued)", r.run_id, extra={"run_id": r.run_id})

    async def check_target(self, run: RunState) -> None:
        """Complete a running run (``target_reward``) once the completions of one version
        reach its target mean reward over ``min_samples``, as the coordinator recomputed them."""
        stop = run.plan.spec.stop
        if (
            run.state == "running"
            and stop.target_reward is not None
            and any(
                r["samples"] >= stop.min_samples and r["mean"] >= stop.target_reward
                for r in self.state.rewards.rewards(run.run_id)
            )
        ):
            await self.finish(run, "completed", "target_reward")

    async def deploy(self, run: RunState, version: int) -> None:
        """Serve ``version`` as model ``<run>``; ``ValueError`` if no such version was made."""
        made = self.state.versions.get(run.run_id, {}).get(version)
        if made is None or made.revoked:
            raise ValueError(f"run {run.run_id!r} has no adapter version {version}"
                             + (" (withdrawn)" if made is not None else ""))  # fmt: skip
        run.deployed = version
        self.state.commit()
        log.info("run %s deploys version %d", run.run_id, version, extra={"run_id": run.run_id})

    async def cancel(self, run: RunState) -> None:
        await self.finish(run, "cancelled", "cancelled")

    def refresh_gauges(self) -> None:
        counts = dict.fromkeys(("queued", "running", "completed", "failed", "cancelled"), 0)
        for run in self.state.book.runs.values():
            counts[run.state] = counts.get(run.state, 0) + 1
        for state, n in counts.items():
            self.state.metrics.runs.labels(state).set(n)
