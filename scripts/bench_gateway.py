"""Benchmark: the gateway's overhead — the same node, the same requests, direct vs through it.

A real coordinator, one real node serving the tiny model (``--serve``) and a real gateway
process (uvicorn + uvloop), on loopback. The same completion requests (``max_tokens`` 1, so the
model's time is small and the gateway's shows) are sent directly to the node (with a serving
token, as the gateway sends them) and through the gateway, alternating, one at a time for
latency and 64 at a time for throughput, with and without streaming. Every answer's ``usage``
is compared with the gateway's usage records.

Agent requests, on the same node: streamed chats (time to the first content chunk) direct and
through the gateway, alternating; JSON-schema-constrained chats vs the same chats unconstrained
(completion tokens per second, 16 at a time, each answer ``max_tokens`` long); chats declaring
a tool (``tool_choice: auto``) vs the same chats with the declaration written into the system
message, the same prompt tokens (requests per second through the gateway, 16 at a time).

Metrics (bench-results/gateway.json):
  overhead_p50_ms, overhead_p99_ms    gateway latency minus direct latency, at p50 and p99
  rps_at_c64_gateway, rps_at_c64_direct, and the same with ``_stream``
  usage_mismatches                    answers whose usage differs from the gateway's record
  ttft_overhead_p50_ms                streamed time to first token, gateway minus direct (goal <= 1)
  grammar_throughput_ratio            tokens/s under a JSON schema / unconstrained (goal >= 0.9)
  tool_call_overhead_ratio            requests/s with a tool declared / plain chat (goal >= 0.95)

Run: ``python scripts/bench_gateway.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)

from node.model.loading import resolve  # noqa: E402
from protocol.accounts import KeyStore, open_database  # noqa: E402
from protocol.chat import tools_prompt  # noqa: E402
from protocol.service.config import data_dir  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.integration.cluster import Cluster  # noqa: E402
from tests.wait import wait_until  # noqa: E402

BODY = {"model": "tiny", "prompt": "ab", "max_tokens": 1, "temperature": 0}
CHAT: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "ab"}],
                        "max_tokens": 4, "temperature": 0}  # fmt: skip
SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 64}
"""Longer than the measured answers: every constrained answer runs to ``max_tokens``, as the
free ones do with ``ignore_eos``, so both sample the same number of tokens."""
TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}}]  # fmt: skip


async def latencies(client: httpx.AsyncClient, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.post(f"{url}/v1/completions", json=BODY)
        r.raise_for_status()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def rps(
    client: httpx.AsyncClient, url: str, total: int, stream: bool
) -> tuple[float, list[Any]]:
    sem = asyncio.Semaphore(64)
    usages: list[Any] = []

    async def one() -> None:
        async with sem:
            body = {**BODY, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
                async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"usage": {' in line:
                            usages.append(line)
            else:
                r = await client.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
                usages.append(r.json()["usage"])

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    return total / (time.perf_counter() - t0), usages


async def first_token_ms(client: httpx.AsyncClient, url: str) -> float:
    """Milliseconds from sending a streamed chat to its first chunk holding content."""
    t0 = time.perf_counter()
    ms = None
    body = {**CHAT, "stream": True}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():  # all of it, so the connection is reused
            content = line.startswith("data: {") and '"content": ""' not in line
            if ms is None and content and '"content"' in line:
                ms = (time.perf_counter() - t0) * 1000
    if ms is None:
        raise RuntimeError("the stream ended without content")
    return ms


async def chats(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], total: int, concurrency: int = 16
) -> tuple[float, int]:
    """``(seconds, completion tokens)`` for ``total`` chats, ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(seed: int) -> None:
        nonlocal tokens
        async with sem:
            r = await client.post(f"{url}/v1/chat/completions", json={**body, "seed": seed})
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(total)))
    return time.perf_counter() - t0, tokens


async def measure_agents(
    direct: str, token: str, gateway: str, key: str, quick: bool
) -> dict[str, float]:
    n_ttft, n_chats, rounds = (60, 32, 2) if quick else (300, 96, 3)
    result: dict[str, float] = {}
    async with (
        httpx.AsyncClient(timeout=300, headers={"authorization": f"Bearer {token}"}) as d,
        httpx.AsyncClient(timeout=300, headers={"authorization": f"Bearer {key}"}) as g,
    ):
        for _ in range(5):  # warm up
            await first_token_ms(d, direct), await first_token_ms(g, gateway)
        ttft_d: list[float] = []
        ttft_g: list[float] = []
        for _ in range(n_ttft):
            ttft_d.append(await first_token_ms(d, direct))
            ttft_g.append(await first_token_ms(g, gateway))
        result["ttft_direct_p50_ms"] = percentile(ttft_d, 0.5)
        result["ttft_gateway_p50_ms"] = percentile(ttft_g, 0.5)
        result["ttft_overhead_p50_ms"] = (
            result["ttft_gateway_p50_ms"] - result["ttft_direct_p50_ms"]
        )

        free = {**CHAT, "max_tokens": 48, "temperature": 1.0, "ignore_eos": True}
        schema = {**free, "response_format": {"type": "json_schema", "json_schema": {
            "name": "numbers", "schema": SCHEMA, "strict": True}}}  # fmt: skip
        # the same prompt tokens: the plain chat carries the tools' declaration as its system
        # message, where a request with tools has it rendered (protocol/chat.py)
        tooled = {**CHAT, "max_tokens": 16, "temperature": 1.0, "tools": TOOLS,
                  "tool_choice": "auto"}  # fmt: skip
        declared = {"role": "system", "content": tools_prompt(TOOLS)}
        plain = {**CHAT, "max_tokens": 16, "temperature": 1.0,
                 "messages": [declared, *CHAT["messages"]]}  # fmt: skip
        for body in (plain, tooled):
            r = await g.post(f"{gateway}/v1/chat/completions", json={**body, "max_tokens": 1})
            result[f"{'tools' if 'tools' in body else 'plain'}_prompt_tokens"] = r.json()["usage"][
                "prompt_tokens"
            ]
        assert result["plain_prompt_tokens"] == result["tools_prompt_tokens"], result
        await chats(d, direct, schema, 16), await chats(g, gateway, tooled, 16)  # warm up
        rates: dict[str, list[float]] = {}
        for _ in range(rounds):  # alternating, so drift in the machine's speed hits both
            for name, client, url, body in (
                ("free", d, direct, free), ("schema", d, direct, schema),
                ("plain", g, gateway, plain), ("tools", g, gateway, tooled),
            ):  # fmt: skip
                seconds, tokens = await chats(client, url, body, n_chats)
                per = tokens if name in ("free", "schema") else n_chats
                rates.setdefault(name, []).append(per / seconds)
        for name, values in rates.items():
            result[f"{name}_per_s"] = statistics.median(values)
        result["grammar_throughput_ratio"] = result["schema_per_s"] / result["free_per_s"]
        result["tool_call_overhead_ratio"] = result["tools_per_s"] / result["plain_per_s"]
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(direct: str, token: str, gateway: str, key: str, quick: bool) -> dict[str, float]:
    """``direct``: the node's URL, opened by a serving ``token`` (as the gateway opens it)."""
    n_lat, n_rps, rounds = (100, 256, 2) if quick else (400, 1024, 3)
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=64)
    result: dict[str, float] = {}
    async with (
        httpx.AsyncClient(
            timeout=120, limits=limits, headers={"authorization": f"Bearer {token}"}
        ) as d,  # fmt: skip
        httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as g,
    ):
        await latencies(d, direct, 10), await latencies(g, gateway, 10)  # warm up
        lat_d: list[float] = []
        lat_g: list[float] = []
        for _ in range(rounds):
            lat_d += await latencies(d, direct, n_lat // rounds)
            lat_g += await latencies(g, gateway, n_lat // rounds)
        result["direct_p50_ms"], result["gateway_p50_ms"] = (
            percentile(lat_d, 0.5),
            percentile(lat_g, 0.5),
        )
        result["direct_p99_ms"], result["gateway_p99_ms"] = (
            percentile(lat_d, 0.99),
            percentile(lat_g, 0.99),
        )
        result["overhead_p50_ms"] = result["gateway_p50_ms"] - result["direct_p50_ms"]
        result["overhead_p99_ms"] = result["gateway_p99_ms"] - result["direct_p99_ms"]
        for stream in (False, True):
            suffix = "_stream" if stream else ""
            rd = [(await rps(d, direct, n_rps, stream))[0] for _ in range(rounds)]
            rg = [(await rps(g, gateway, n_rps, stream))[0] for _ in range(rounds)]
            result[f"rps_at_c64_direct{suffix}"] = statistics.median(rd)
            result[f"rps_at_c64_gateway{suffix}"] = statistics.median(rg)
    return result


def usage_mismatches(gateway: str, key: str, returned: list[Any]) -> int:
    """Records whose tokens differ from what the answers said (sums compared per request)."""
    data = httpx.get(f"{gateway}/v1/usage", headers={"authorization": f"Bearer {key}"}).json()
    recorded = sorted(u["prompt_tokens"] + u["completion_tokens"] for u in data["data"])
    answered = sorted(u["total_tokens"] for u in returned)
    return sum(a != b for a, b in zip(recorded, answered, strict=False)) + abs(
        len(recorded) - len(answered)
    )


async def usage_run(gateway: str, key: str) -> list[Any]:
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=120, headers=headers) as g:
        return (await rps(g, gateway, 128, False))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s on 2 cores)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "gateway.json")
    args = parser.parse_args()
    tiny = resolve("tiny", data_dir())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cluster = Cluster(root, interval_s=2.0)
        db = f"sqlite:///{root / 'gateway.db'}"
        try:
            # the direct client holds one serving token for the whole benchmark
            cluster.start_coordinator(extra=["--serving_token_ttl_s=86400"])
            cluster.start_node("server", extra=["--serve", f"--model_cache={data_dir()}"])
            port = free_port()
            cluster.spawn("gateway", root / "gw", [
                "gateway", "start", "--coordinator-url", cluster.url, "--listen",
                f"127.0.0.1:{port}", "--db", db, f"--tokenizers.tiny={tiny}",
            ], env=cluster.gateway_env())  # fmt: skip
            gateway = f"http://127.0.0.1:{port}"
            wait_until(lambda: httpx.get(f"{gateway}/health").json()["nodes"] == 1, 120,
                       what="the gateway")  # fmt: skip
            route = cluster.routes(cluster.admit_gateway("bench-direct"))["server"]
            direct = route["url"]
            wait_until(lambda: httpx.get(f"{direct}/health").is_success, 120, what="the model")
            key, _ = KeyStore(open_database(db)).create("bench")
            result = asyncio.run(measure(direct, route["token"], gateway, key, args.quick))
            result |= asyncio.run(measure_agents(direct, route["token"], gateway, key, args.quick))
            key2, _ = KeyStore(open_database(db)).create("usage")
            result["usage_mismatches"] = usage_mismatches(
                gateway, key2, asyncio.run(usage_run(gateway, key2))
            )
        finally:
            cluster.stop_all()
    table = Table(title="gateway vs direct to the node (tiny model, max_tokens 1, loopback)")
    for col in ("metric", "direct", "gateway", "overhead / ratio"):
        table.add_column(col, justify="right")
    for q in ("p50", "p99"):
        d, g, o = (result[f"{k}_{q}_ms"] for k in ("direct", "gateway", "overhead"))
        table.add_row(f"latency {q}", f"{d:.2f} ms", f"{g:.2f} ms", f"{o:+.2f} ms")
    for suffix, label in (("", "rps at c=64"), ("_stream", "rps at c=64, streaming")):
        d, g = result[f"rps_at_c64_direct{suffix}"], result[f"rps_at_c64_gateway{suffix}"]
        table.add_row(label, f"{d:,.0f}", f"{g:,.0f}", f"{g / d:.2f}x")
    table.add_row("usage mismatches", "", str(result["usage_mismatches"]), "")
    d, g, o = (result[f"ttft_{k}_p50_ms"] for k in ("direct", "gateway", "overhead"))
    table.add_row("time to first token p50, streamed chat", f"{d:.2f} ms", f"{g:.2f} ms",
                  f"{o:+.2f} ms")  # fmt: skip
    f, c = result["free_per_s"], result["schema_per_s"]
    table.add_row("tokens/s: free vs JSON schema (direct)", f"{f:,.0f}", f"{c:,.0f}",
                  f"{result['grammar_throughput_ratio']:.2f}x")  # fmt: skip
    p, t = result["plain_per_s"], result["tools_per_s"]
    table.add_row("chats/s: plain vs a tool declared", f"{p:,.1f}", f"{t:,.1f}",
                  f"{result['tool_call_overhead_ratio']:.2f}x")  # fmt: skip
    Console().print(table)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
