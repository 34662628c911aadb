"""Schemathesis against the gateway's own OpenAPI schema: generated requests (valid and
invalid bodies, for every operation) never get a server error. The gateway is a real process,
routing to a fake node (``fake_node.py``) so thousands of requests take seconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from protocol.accounts import KeyStore, open_database
from tests.integration.cluster import Cluster
from tests.integration.fake_node import FakeNode, Setup

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("schema")
    with FakeNode() as node:
        setup = Setup(Cluster(root), node, f"sqlite:///{root / 'gateway.db'}", tiny_model)
        try:
            setup.start_gateway()
            yield setup
        finally:
            setup.cluster.stop_all()


@pytest.fixture(scope="module")
def api_key(gateway: Setup) -> str:
    return KeyStore(open_database(gateway.db)).create("fuzz")[0]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(
    gateway: Setup, api_key: str, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {
        "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/usage",
        "GET /v1/models/{model}",
    } <= labels  # fmt: skip
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    fields = spec["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"tools", "tool_choice", "parallel_tool_calls", "response_format"} <= set(fields)
    headers = {"authorization": f"Bearer {api_key}"}
    calls: dict[str, list[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)  # fmt: skip
        def call(case: Any) -> None:
            response = case.call_and_validate(
                base_url=gateway.url, headers=headers, checks=[not_a_server_error]
            )
            calls.setdefault(case.operation.label, []).append(response.status_code)

        try:
            call()
        except Unsatisfiable:  # nothing about this operation can be invalid (no parameters)
            assert mode == GenerationMode.NEGATIVE and not operation.body
    for label in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert len(calls[label]) >= 50, label
    assert all(status < 500 for statuses in calls.values() for status in statuses)
