"""The coordinator's REST API (FastAPI): health, metrics, the network's nodes, runs.

Errors are OpenAI-style JSON, ``{"error": {"message", "type", "param", "code"}}``, with the
HTTP status that fits (400 for a bad run spec, 404 for an unknown run, 409 for a taken run id).
Endpoints that touch coordinator state are ``async``, so they run on the coordinator's own trio
loop, never beside it in a thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.runs import RunSpec
from protocol.api_errors import APIError, install_error_handlers

if TYPE_CHECKING:
    from coordinator.server import Coordinator


def create_app(coord: Coordinator) -> FastAPI:
    app = FastAPI(title="Bazaar coordinator", version=coord.software_version)

    install_error_handlers(app)

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
        if spec.run_id and spec.run_id in coord.work.book.runs:
            raise APIError(409, f"run {spec.run_id!r} already exists", "run_exists", "run_id")
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

    @app.get("/v1/runs/{run_id}/rollouts")
    async def rollouts(run_id: str) -> dict[str, Any]:
        _run(run_id)
        data = coord.work.rollouts(run_id)
        for r in data:
            node = coord.membership.nodes.get(r["producer"])
            r["producer_addrs"] = node.addrs if node else []
        return {"object": "list", "data": data}

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
