"""The coordinator's REST API (FastAPI): health, metrics, the network's nodes and what the
coordinator knows of their honesty (``/v1/trust``), runs, the ledger; and the dashboard (``/``:
``dashboard.html``, a page that reads this API).

Errors are OpenAI-style JSON, ``{"error": {"message", "type", "param", "code"}}``, with the
HTTP status that fits (400 for a bad run spec, 401 for a missing or bad key, 402 for a spent
budget, 403 for another key's run, 404 for an unknown run, 409 for a taken run id).

Submitting, cancelling and deploying a run take the researcher's API key (``Authorization:
Bearer bz-...``, a key of the accounts database the gateway meters with): the run is billed to
it and only it may cancel or deploy the run. Reading is open (the dashboard reads it), except
where the serving nodes are: ``/v1/network/routes`` (their URLs, each with a serving token)
answers only admitted gateways (``Authorization: Bearer bzg-...``, ``coordinator/gateways.py``),
and no open view shows a serving URL.
Endpoints that touch coordinator state are ``async``, so they run on the coordinator's own trio
loop, never beside it in a thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict

from coordinator import views as queries
from coordinator.billing import KINDS
from coordinator.db import RunState
from protocol.accounts import ApiKey
from protocol.errors import ConfigError
from protocol.runs import decode_spec
from protocol.service.api_errors import APIError, install_error_handlers

if TYPE_CHECKING:
    from coordinator.server import Coordinator


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = None
    """The version to deploy; empty: the run's current one."""


def create_app(coord: Coordinator) -> FastAPI:
    app = FastAPI(title="Bazaar coordinator", version=coord.software_version)

    install_error_handlers(app)
    bearer = Depends(HTTPBearer(auto_error=False, description="From `bazaar keys create`"))

    async def researcher(
        credentials: HTTPAuthorizationCredentials | None = bearer,
    ) -> ApiKey | None:
        """The key a request presents; None only on an open network (``open_runs``)."""
        presented = credentials.credentials.strip() if credentials else ""
        if not presented:
            if coord.config.open_runs:
                return None
            raise APIError(401, "no API key: send 'Authorization: Bearer <key>' (bazaar keys "
                           "create; the CLI reads BAZAAR_API_KEY)", "missing_api_key")  # fmt: skip
        key = await trio.to_thread.run_sync(coord.accounts.authenticate, presented)
        if key is None:
            raise APIError(401, "invalid or revoked API key", "invalid_api_key")
        return key

    key_dep = Depends(researcher)
    admitted = HTTPBearer(auto_error=False, description="From `bazaar gateway admit`")
    gateway_bearer = Depends(admitted)

    async def admitted_gateway(
        credentials: HTTPAuthorizationCredentials | None = gateway_bearer,
    ) -> str:
        """The name of the admitted gateway a request comes from."""
        presented = credentials.credentials.strip() if credentials else ""
        if not presented:
            raise APIError(401, "the serving routes are for admitted gateways: send "
                           "'Authorization: Bearer <secret>' (bazaar gateway admit NAME)",
                           "missing_gateway_secret")  # fmt: skip
        name = await trio.to_thread.run_sync(coord.gateways.store.authenticate, presented)
        if name is None:
            raise APIError(401, "invalid or revoked gateway secret", "invalid_gateway_secret")
        return name

    gateway_dep = Depends(admitted_gateway)

    def owned(run: RunState, key: ApiKey | None) -> RunState:
        if run.owner and (key is None or key.name != run.owner):
            raise APIError(403, f"run {run.run_id!r} belongs to another key",
                           "not_run_owner", "run_id")  # fmt: skip
        return run

    page = (Path(__file__).parent / "dashboard.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> str:
        """Nodes, runs, a run's reward curve and rollouts, the ledger, reputation, bans and
        audits, refreshed every few seconds."""
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
        data = queries.nodes(coord.membership, coord.state, coord.clock())
        return {"object": "list", "data": data}

    @app.get("/v1/network/routes")
    async def routes(gateway: str = gateway_dep) -> dict[str, Any]:
        """For an admitted gateway: every live serving node (URL, models) with a serving token
        for this gateway at that node, and the fingerprint of each base model's tokenizer the
        coordinator has (a gateway checks a node's tokenizer files against it)."""
        data = coord.gateways.routes(gateway, coord.membership.nodes.values())
        return {"object": "list", "data": data, "tokenizers": coord.tokenizers.fingerprints()}

    @app.get("/v1/network/verdicts")
    async def verdicts() -> dict[str, Any]:
        """Every verdict, oldest first, with the verifier's signed frame (hex) as evidence; and
        how many known answers (honest, cheats) the coordinator keeps to check verifiers with."""
        data = queries.verdicts(coord.state, coord.membership)
        known = queries.known_answer_stock(coord.state, coord.payloads.__contains__)
        return {"object": "list", "data": data, "known_answers": known}

    @app.post("/v1/runs", status_code=201)
    async def create_run(request: Request, key: ApiKey | None = key_dep) -> dict[str, Any]:
        """Submit a run: the body is a run spec (``protocol/runs.py``) as JSON."""
        try:
            spec = decode_spec(await request.body())
        except ConfigError as e:
            raise APIError(400, str(e), "invalid_request") from None
        if (
            key is not None
            and key.budget_tokens is not None
            and (key.used_tokens + key.reserved_tokens >= key.budget_tokens)
        ):
            raise APIError(402, f"key {key.name!r} has spent its budget of {key.budget_tokens} "
                           "tokens", "insufficient_quota")  # fmt: skip
        if spec.name and queries.find_run(coord.state, spec.name):
            raise APIError(409, f"run {spec.name!r} already exists", "run_exists", "name")
        try:
            run = await coord.runs.create(spec, key)
        except ValueError as e:
            raise APIError(400, str(e), "invalid_run", "env") from None
        return queries.run_view(coord.state, run)

    @app.get("/v1/runs")
    async def list_runs() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [queries.run_view(coord.state, r) for r in queries.runs(coord.state)],
        }

    @app.get("/v1/runs/{run_id}")
    async def get_run(run_id: str) -> dict[str, Any]:
        return queries.run_view(coord.state, _run(run_id))

    @app.post("/v1/runs/{run_id}/deploy")
    async def deploy_run(
        run_id: str, body: DeployRequest, key: ApiKey | None = key_dep
    ) -> dict[str, Any]:
        """Serve an adapter version (default: the run's current one) as model ``<run>``; serving
        nodes fetch it like any version."""
        run = owned(_run(run_id), key)
        version = run.policy_version if body.version is None else body.version
        try:
            await coord.runs.deploy(run, version)
        except ValueError as e:
            raise APIError(404, str(e), "version_not_found", "version") from None
        await coord.announce_deployment(run_id, version)
        return queries.run_view(coord.state, run)

    @app.post("/v1/runs/{run_id}/cancel")
    async def cancel_run(run_id: str, key: ApiKey | None = key_dep) -> dict[str, Any]:
        """Stop a queued or running run: no more leases or rounds; what was delivered and
        trained stays."""
        run = owned(_run(run_id), key)
        if run.state not in ("queued", "running"):
            raise APIError(409, f"run {run_id!r} is {run.state}", "run_not_running", "run_id")
        await coord.runs.cancel(run)
        return queries.run_view(coord.state, run)

    @app.get("/v1/runs/{run_id}/rollouts")
    async def rollouts(run_id: str) -> dict[str, Any]:
        _run(run_id)
        data = queries.rollouts(coord.state, run_id, coord.membership)
        return {"object": "list", "data": data}

    @app.get("/v1/runs/{run_id}/rewards")
    async def rewards(run_id: str) -> dict[str, Any]:
        """Reward by the version completions were sampled at (count, mean, std), as the
        trainers recomputed it for the completions they trained on."""
        _run(run_id)
        return {"object": "list", "data": queries.rewards(coord.state, run_id)}

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
        data = [x for x in queries.samples(coord.state, run_id)
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

    @app.get("/v1/ledger")
    async def ledger(
        run: str | None = None, node: str | None = None, kind: str | None = None
    ) -> dict[str, Any]:
        """The billing journal (of one run, or one node's entries; ``kind``: only its entries
        of that kind, e.g. ``refund``), balances and totals by account, and every run's
        reconciliation: charges = tokens processed = the key's usage records."""
        if run is not None:
            _run(run)
        if kind is not None and kind not in KINDS:
            raise APIError(400, f"kind is one of {', '.join(KINDS)}", "invalid_request", "kind")
        return await queries.ledger(coord.state, coord.recounter.kept_count, run, node, kind)

    @app.get("/v1/trust")
    async def trust(recent: int = 50) -> dict[str, Any]:
        """Every node's audit record (and whatever else its trust record holds), the bans, the
        ``recent`` newest verdicts (the coordinator's own convictions named "coordinator") and
        the known-answer results."""
        if not 1 <= recent <= 1000:
            raise APIError(400, "recent is 1..1000", "invalid_request", "recent")
        return queries.trust_summary(coord.state, coord.membership, coord.peer_id, recent)

    @app.get("/v1/runs/{run_id}/versions")
    async def versions(run_id: str) -> dict[str, Any]:
        """The run's adapter versions: manifest hash, the trainers that hold each, the replays
        of the rounds that made it, and whether a rollback withdrew it."""
        _run(run_id)
        return {"object": "list", "data": queries.versions(coord.state, run_id)}

    @app.get("/v1/runs/{run_id}/replays")
    async def replays(run_id: str) -> dict[str, Any]:
        """The replay audits of the run's trainers' rounds, with their verdicts."""
        _run(run_id)
        return {"object": "list", "data": queries.replays(coord.state, run_id)}

    def _run(run_id: str) -> RunState:
        run = queries.find_run(coord.state, run_id)
        if run is None:
            raise APIError(404, f"no run {run_id!r}", "run_not_found", "run_id")
        return run

    return app
