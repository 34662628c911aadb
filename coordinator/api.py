"""The coordinator's REST API (FastAPI): health, metrics, the network's nodes, runs; and the
dashboard (``/``: ``dashboard.html``, a page that reads this API).

Errors are OpenAI-style JSON, ``{"error": {"message", "type", "param", "code"}}``, with the
HTTP status that fits (400 for a bad run spec, 404 for an unknown run, 409 for a taken run id).
Endpoints that touch coordinator state are ``async``, so they run on the coordinator's own trio
loop, never beside it in a thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Response
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict

from coordinator.runs import RunSpec
from protocol.api_errors import APIError, install_error_handlers

if TYPE_CHECKING:
    from coordinator.server import Coordinator


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = None
    """The version to deploy; empty: the run's current one."""


def create_app(coord: Coordinator) -> FastAPI:
    app = FastAPI(title="Bazaar coordinator", version=coord.software_version)

    install_error_handlers(app)
    page = (Path(__file__).parent / "dashboard.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> str:
        """Nodes, runs, a run's reward curve and rollouts, refreshed every few seconds."""
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "peer_id": coord.peer_id,
            "multiaddrs": coord.multiaddrs,
            "nodes": coord.membership.counts(),
        }

    @app.get("/v1/network/hivemind")
    async def hivemind() -> dict[str, Any]:
        """Where trainers join the hivemind DHT (started on the first ask)."""
        try:
            return {"initial_peers": await coord.hivemind_peers()}
        except RuntimeError as e:
            raise APIError(503, str(e), "hivemind_unavailable") from None

    @app.get("/metrics")
    async def metrics() -> Response:
        coord.refresh_gauges()
        return Response(generate_latest(coord.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/network/nodes")
    async def nodes() -> dict[str, Any]:
        now = coord.clock()
        views = []
        for n in coord.membership.nodes.values():
            t = coord.work.audits.trust_of(n.peer_id)
            trust = {**vars(t), "reputation": round(t.reputation, 4)}
            views.append({**n.view(now), "trust": trust})
        views.sort(key=lambda v: (v["status"] != "alive", str(v["name"])))
        return {"object": "list", "data": views}

    @app.get("/v1/network/verdicts")
    async def verdicts() -> dict[str, Any]:
        """Every verdict, oldest first, with the verifier's signed frame (hex) as evidence."""
        names = {p: n.name for p, n in coord.membership.nodes.items()}
        out = [
            {
                "audit_id": a.audit_id,
                "lease_id": a.lease_id,
                "run_id": a.run_id,
                "producer": a.producer,
                "producer_name": names.get(a.producer, a.producer[:12]),
                "stage": "first" if i == 0 else "confirm",
                "audit_status": a.status,
                "verifier": v.verifier,
                "verifier_name": names.get(v.verifier, v.verifier[:12]),
                "passed": v.passed,
                "failed_check": v.failed_check,
                "detail": v.detail,
                "at": v.at,
                "signed_frame": v.frame.hex(),
            }
            for a in coord.work.audits.audits.values()
            for i, v in enumerate(a.verdicts)
        ]
        out.sort(key=lambda v: v["at"])
        return {"object": "list", "data": out}

    @app.post("/v1/runs", status_code=201)
    async def create_run(spec: RunSpec) -> dict[str, Any]:
        if spec.name and spec.name in coord.work.book.runs:
            raise APIError(409, f"run {spec.name!r} already exists", "run_exists", "name")
        try:
            run = await coord.work.create_run(spec)
        except ValueError as e:
            raise APIError(400, str(e), "invalid_run", "env") from None
        return coord.work.run_view(run)

    @app.get("/v1/runs")
    async def list_runs() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [coord.work.run_view(r) for r in coord.work.book.runs.values()],
        }

    @app.get("/v1/runs/{run_id}")
    async def get_run(run_id: str) -> dict[str, Any]:
        return coord.work.run_view(_run(run_id))

    @app.post("/v1/runs/{run_id}/deploy")
    async def deploy_run(run_id: str, body: DeployRequest) -> dict[str, Any]:
        """Serve an adapter version (default: the run's current one) as model ``<run>``; serving
        nodes fetch it like any version."""
        run = _run(run_id)
        version = run.policy_version if body.version is None else body.version
        try:
            await coord.work.deploy(run, version)
        except ValueError as e:
            raise APIError(404, str(e), "version_not_found", "version") from None
        await coord.announce_deployment(run_id, version)
        return coord.work.run_view(run)

    @app.post("/v1/runs/{run_id}/cancel")
    async def cancel_run(run_id: str) -> dict[str, Any]:
        """Stop a running run: no more leases or rounds; what was delivered and trained stays."""
        run = _run(run_id)
        if run.state != "running":
            raise APIError(409, f"run {run_id!r} is {run.state}", "run_not_running", "run_id")
        await coord.work.cancel_run(run)
        return coord.work.run_view(run)

    @app.get("/v1/runs/{run_id}/rollouts")
    async def rollouts(run_id: str) -> dict[str, Any]:
        _run(run_id)
        data = coord.work.rollouts(run_id)
        for r in data:
            node = coord.membership.nodes.get(r["producer"])
            r["producer_addrs"] = node.addrs if node else []
        return {"object": "list", "data": data}

    @app.get("/v1/runs/{run_id}/rewards")
    async def rewards(run_id: str) -> dict[str, Any]:
        """Reward by the version completions were sampled at (count, mean, std), as the
        trainers recomputed it for the completions they trained on."""
        _run(run_id)
        return {"object": "list", "data": coord.work.reports.rewards(run_id)}

    @app.get("/v1/runs/{run_id}/samples")
    async def samples(
        run_id: str, version: int | None = None, order: str = "recent", n: int = 20
    ) -> dict[str, Any]:
        """Completions as text (prompt, completion, reward, version): the most ``recent``, or
        the ``best`` or ``worst`` by reward; optionally of one version."""
        _run(run_id)
        if order not in ("recent", "best", "worst") or not 1 <= n <= 1000:
            raise APIError(400, "order is recent, best or worst; n is 1..1000", "invalid_request",
                           "order")  # fmt: skip
        data = [x for x in coord.work.reports.samples(run_id)
                if version is None or x["version"] == version]  # fmt: skip
        if order == "recent":
            data = data[-n:]
        else:
            data = sorted(data, key=lambda x: x["reward"], reverse=order == "best")[:n]
        return {"object": "list", "data": data}

    @app.get("/v1/runs/{run_id}/logs")
    async def logs(run_id: str, after: int = 0) -> dict[str, Any]:
        """The coordinator's log lines about the run, numbered; ``after`` the last one seen."""
        _run(run_id)
        return {"object": "list", "data": coord.runlog.after(run_id, after)}

    @app.get("/v1/runs/{run_id}/versions")
    async def versions(run_id: str) -> dict[str, Any]:
        """The run's adapter versions: manifest hash and the trainers that hold each."""
        _run(run_id)
        return {"object": "list", "data": coord.work.versions_view(run_id)}

    def _run(run_id: str) -> Any:
        run = coord.work.book.runs.get(run_id)
        if run is None:
            raise APIError(404, f"no run {run_id!r}", "run_not_found", "run_id")
        return run

    return app
