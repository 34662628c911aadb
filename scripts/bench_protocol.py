"""Benchmark: the signed wire path against plain msgpack, on the same data, in the same run.

Ours: ``seal`` (encode + Ed25519 sign) then ``open_envelope`` (size/version checks, verify,
strict typed decode, replay check). Baseline: ``msgpack.packb`` + ``msgpack.unpackb`` of the same
fields as a plain dict, no types, no signature. Two messages: a heartbeat and a ~1 MiB rollout
payload (uint32 token ids + float32 logprobs). Rounds of the two alternate, and the median round
is reported, so machine noise hits both sides alike.

Metrics (bench-results/protocol.json):
  heartbeat_msgs_per_s            signed heartbeats through seal+open per second
  payload_mb_per_s                MiB of rollout payload through seal+open per second
  signed_vs_plain_ratio_payload   time of signed path / time of plain msgpack, payload (>= 1)
  signed_vs_plain_ratio_heartbeat the same for heartbeats
  plain_heartbeat_msgs_per_s, plain_payload_mb_per_s: the baseline's own throughput

Run: ``python scripts/bench_protocol.py [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import msgspec
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import write_result  # noqa: E402  (scripts/, beside this file)

from protocol.envelope import ReplayGuard, open_envelope, seal  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.membership import Heartbeat  # noqa: E402
from tests.examples import rollout_payload  # noqa: E402


def _median_round(fn: Callable[[], None], iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def measure(ours: Callable[[], None], plain: Callable[[], None], iters: int, rounds: int):
    ours_t, plain_t = [], []
    for _ in range(rounds):
        ours_t.append(_median_round(ours, iters))
        plain_t.append(_median_round(plain, iters))
    return statistics.median(ours_t), statistics.median(plain_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s on 2 cores)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "protocol.json")
    args = parser.parse_args()
    hb_iters, pl_iters, rounds = (2000, 20, 5) if args.quick else (20000, 100, 9)

    ident = Identity.generate()
    guard = ReplayGuard()

    heartbeat = Heartbeat(seq=12345, uptime_s=3600.5, load=0.25)
    hb_plain = msgspec.to_builtins(heartbeat)

    payload = rollout_payload(1 << 20)
    pl_plain = msgspec.to_builtins(payload)
    payload_mib = len(msgspec.msgpack.encode(payload)) / (1 << 20)

    def ours(msg: object) -> Callable[[], None]:
        return lambda: open_envelope(seal(ident, msg), guard)  # type: ignore[arg-type]

    def plain(obj: object) -> Callable[[], None]:
        return lambda: msgpack.unpackb(msgpack.packb(obj), raw=False)

    hb_ours, hb_base = measure(ours(heartbeat), plain(hb_plain), hb_iters, rounds)
    pl_ours, pl_base = measure(ours(payload), plain(pl_plain), pl_iters, rounds)

    result = {
        "heartbeat_msgs_per_s": 1 / hb_ours,
        "payload_mb_per_s": payload_mib / pl_ours,
        "signed_vs_plain_ratio_payload": pl_ours / pl_base,
        "signed_vs_plain_ratio_heartbeat": hb_ours / hb_base,
        "plain_heartbeat_msgs_per_s": 1 / hb_base,
        "plain_payload_mb_per_s": payload_mib / pl_base,
        "payload_mib": payload_mib,
        "quick": int(args.quick),
    }

    table = Table(title="protocol: seal+open vs plain msgpack (median of alternating rounds)")
    for col in ("message", "bazaar (signed, typed)", "plain msgpack", "signed / plain time"):
        table.add_column(col, justify="right")
    table.add_row(
        "heartbeat",
        f"{result['heartbeat_msgs_per_s']:,.0f} msg/s",
        f"{result['plain_heartbeat_msgs_per_s']:,.0f} msg/s",
        f"{result['signed_vs_plain_ratio_heartbeat']:.2f}x",
    )
    table.add_row(
        f"rollout payload ({payload_mib:.2f} MiB)",
        f"{result['payload_mb_per_s']:,.0f} MiB/s",
        f"{result['plain_payload_mb_per_s']:,.0f} MiB/s",
        f"{result['signed_vs_plain_ratio_payload']:.2f}x",
    )
    Console().print(table)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
