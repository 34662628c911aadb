"""Benchmark: the gateway's overhead — the same node, the same requests, direct vs through it.

A real coordinator, one real node serving the tiny model (``--serve``) and a real gateway
process (uvicorn + uvloop), on loopback. The same completion requests (``max_tokens`` 1, so the
model's time is small and the gateway's shows) are sent directly to the node (with a serving
token, as the gateway sends them) and through the gateway, alternating, one at a time for
latency and 64 at a time for throughput, with and without streaming. Every answer's ``usage``
is compared with the gateway's usage records.

Metrics (bench-results/gateway.json):
  overhead_p50_ms, overhead_p99_ms    gateway latency minus direct latency, at p50 and p99
  rps_at_c64_gateway, rps_at_c64_direct, and the same with ``_stream``
  usage_mismatches                    answers whose usage differs from the gateway's record

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
from protocol.service.config import data_dir  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.integration.cluster import Cluster  # noqa: E402
from tests.wait import wait_until  # noqa: E402

BODY = {"model": "tiny", "prompt": "ab", "max_tokens": 1, "temperature": 0}


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
    Console().print(table)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
