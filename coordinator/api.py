"""The coordinator's REST API (FastAPI): health, metrics, the network's nodes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from coordinator.server import Coordinator


def create_app(coord: Coordinator) -> FastAPI:
    app = FastAPI(title="Bazaar coordinator", version=coord.software_version)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "peer_id": coord.peer_id,
            "multiaddrs": coord.multiaddrs,
            "nodes": coord.membership.counts(),
        }

    @app.get("/metrics")
    def metrics() -> Response:
        coord.refresh_gauges()
        return Response(generate_latest(coord.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/network/nodes")
    def nodes() -> dict[str, Any]:
        now = coord.clock()
        views = [n.view(now) for n in coord.membership.nodes.values()]
        views.sort(key=lambda v: (v["status"] != "alive", str(v["name"])))
        return {"object": "list", "data": views}

    return app
