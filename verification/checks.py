"""Audit checks of a rollout payload by recomputation: cheapest first, failing closed.

``verify_payload`` runs, for one lease's payload, the checks below in this order and stops at the
first that fails; the ``Outcome`` names it. The payload's envelope (signature, schema, size, the
producer as signer, the receipt's hash) is checked when it is fetched (``node/store/payloads.py``);
its failures are reported as ``signature`` by the verifier, and a producer that cannot serve the
payload before the audit's deadline fails as ``unavailable``.

==================  =================================================================  ==========
check               fails when                                                          needs
==================  =================================================================  ==========
``lease``           the payload is for another lease/run, or its samples are not        —
                    exactly the lease's (example, slot) pairs in order
``token_count``     the payload's completion tokens are not what its receipt claimed      —
                    (``claimed_tokens``, sent with the audit; the coordinator counts
                    every payload itself, verifiers and trainers count again)
``policy_version``  its version is not the lease's, or is outside the allowed          —
                    staleness window behind the run's current version
``seed``            a sample's seed is not the one derived from the lease               hashing
``termination``     tokens past ``max_tokens``, an end-of-sequence token before the     —
                    end, ``stop`` without a final EOS, ``length`` short of max_tokens
``env_turns``       an episode's environment turns are not what the environment         env
                    answers to its model turns (a forged tool result, an edited turn),
                    or a model turn follows the end of the episode
``reward``          the producer's claimed reward differs from the environment's        env
``sampling_replay`` at some position the committed token is not the seeded sampler's    1 prefill
                    pick (best score − committed score above the calibrated margin)
``logprobs``        a committed logprob differs from the recomputed one by more than    same
                    the calibrated tolerance
(exact replay)      a lease that passed but looks off (a token not the seeded pick, a   1 generation
                    logprob fitting only another top-p boundary, a lease statistic
                    past half its limit) is generated again as
                    the producer's profile generates it, where the verifier can
                    (``Regenerate``): a token that differs fails ``sampling_replay``, a
                    logprob that differs in any bit ``logprobs``
==================  =================================================================  ==========

The canonical prompt and the seeds are rebuilt from the lease (``verification/rollouts.py``),
never read from the producer. Thresholds come from honest runs per dtype profile
(``verification/thresholds.toml``, written by ``scripts/calibrate_verification.py``).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from envs.base import Environment, MultiTurnEnvironment
from protocol.errors import DecodeError
from protocol.leases import Lease
from protocol.rollouts import ComputeProfile, RolloutPayload
from verification.episodes import (
    EpisodeMismatch,
    Rebuilt,
    env_turn_tokens,
    rebuild,
    split_turns,
    turn_seed,
)
from verification.rollouts import (
    check_shape,
    count_tokens,
    lease_examples,
    prompt_ids,
    sample_seeds,
    sample_tokens,
)
from verification.sampling import TOP_P_SLACK, honest_logprobs, replay_margins

CHECKS = (
    "unavailable",
    "signature",
    "lease",
    "token_count",
    "policy_version",
    "seed",
    "termination",
    "env_turns",
    "reward",
    "sampling_replay",
    "logprobs",
)
THRESHOLDS_FILE = Path(__file__).with_name("thresholds.toml")
"""The tiny model's thresholds: those of any model not calibrated on its own."""
THRESHOLDS_DIR = Path(__file__).with_name("thresholds")
"""A model's own thresholds, as ``<model_key>.toml``."""
REWARD_TOLERANCE = 1e-6
UNCERTAIN_LOGPROB = -0.01
"""A token the model was unsure of: its recomputed logprob is below this. Near-certain tokens
(and those alone left in a top-p set) replay at logprob 0 whatever the weights: they say
nothing about which model sampled them."""
MIN_UNCERTAIN = 8

ESCALATE_AT = 0.5
"""A lease that passed is replayed exactly, where the verifier can (``Regenerate``), when a token
is off the seeded pick, a claimed logprob matches only a top-p boundary other than the
verifier's (``Replay.elsewhere``), or a lease statistic is above this share of its limit."""

ELSEWHERE_SLACKS = 3.0

Regenerate = Callable[[], list[tuple[list[int], list[float]]]]
"""``regenerate() -> [(model token ids, logprobs), ...]``: the lease generated again, per
sample, as the producer's profile generates it (backend, dtype, device class, threads):
bit-identical to honest work, batched as ``node.model.rollouts.Producer`` does. Low-precision
replays by prefill drift from generation by more than a near-runner-up swap moves a token; this
does not."""

Prefill = Callable[[list[tuple[list[int], list[int]]]], list[torch.Tensor]]
"""``prefill([(prompt ids, completion ids), ...]) -> [logits [T, V], ...]`` with the claimed model
and adapter: a backend's ``prefill_batch``, which replays a whole lease in a few forward passes."""


@dataclass(frozen=True)
class Thresholds:
    """How far an honest replay may drift, for one dtype profile: per token, and over a whole
    lease (a subtle cheat stays under the per-token limits on every token, not on average)."""

    max_margin: float
    max_logprob_diff: float
    max_mean_logprob_diff: float = math.inf
    """|Mean| over the lease's tokens of claimed − recomputed logprob: honest drift averages
    out, logprobs inflated (or deflated) a little on every token do not."""
    max_drift: float = math.inf
    """How far the lease's logprobs drift from the recomputed ones, as the geometric mean of two
    sizes of |claimed − recomputed|: the median over the tokens the model was unsure of
    (``UNCERTAIN_LOGPROB``, at least ``MIN_UNCERTAIN`` of them; the bulk) and the root mean square
    over all tokens (the tail). Honest rounding drift is either sparse (most tokens replay
    exactly, a few drift far: a small median) or small everywhere (a small root mean square),
    never both; a producer sampling with other weights — a noisy, cheaper or damaged model —
    moves every uncertain token, and both with them, while staying under the per-token limits."""
    top_p_slack: float = TOP_P_SLACK
    """Probability mass by which the producer's arithmetic may place the top-p boundary
    elsewhere than the verifier's: tokens that close to it may or may not have been in the set
    the producer sampled from (``honest_logprobs``, ``replay_margins``)."""
    replaced_rate: float = 1.0
    """How often an honest token is not the seeded sampler's pick on replay (a margin above 0:
    a near-tie the replay's rounding broke the other way). A lease fails when it has more such
    tokens than that rate makes likely at odds of a million to one (``replaced_limit``);
    a producer swapping in near runner-ups does it often. 1.0: not checked."""


class UncalibratedPair(ValueError):
    """No thresholds were calibrated for this producer's profile checked in this verifier's."""


def load_thresholds(profile: str, path: Path = THRESHOLDS_FILE) -> Thresholds:
    """The calibrated thresholds of ``profile``: ``fp32`` or ``bf16`` (producer and verifier
    alike), or ``PRODUCER>VERIFIER`` (``bf16>fp32``: a bf16 producer checked in fp32)."""
    data = tomllib.loads(path.read_text())
    if profile not in data:
        raise UncalibratedPair(f"no calibrated profile {profile!r} in {path}; have {sorted(data)}")
    p = data[profile]
    return Thresholds(
        float(p["max_margin"]), float(p["max_logprob_diff"]),
        float(p.get("max_mean_logprob_diff", math.inf)),
        float(p.get("max_drift", math.inf)),
        float(p.get("top_p_slack", TOP_P_SLACK)),
        float(p.get("replaced_rate", 1.0)),
    )  # fmt: skip


def model_key(config: Any) -> str:
    """What thresholds are calibrated per: a model's architecture and size, from its config
    (``llama-30x576-v49152`` is SmolLM2-135M)."""
    return (
        f"{config.model_type}-{config.num_hidden_layers}x{config.hidden_size}-v{config.vocab_size}"
    )


def thresholds_path(model: str | None) -> Path:
    """The thresholds file of ``model`` (a ``model_key``): its own if it was calibrated, else
    the tiny model's."""
    own = THRESHOLDS_DIR / f"{model}.toml"
    return own if model and own.exists() else THRESHOLDS_FILE


def calibrated_dtypes(model: str | None) -> list[str]:
    """The dtypes ``model``'s thresholds judge payloads of (each replayed in its own dtype)."""
    data = tomllib.loads(thresholds_path(model).read_text())
    return sorted(k for k in data if ">" not in k)


def thresholds_for(
    producer: ComputeProfile | None,
    verifier: ComputeProfile,
    path: Path | None = None,
    model: str | None = None,
) -> Thresholds:
    """The thresholds a verifier computing as ``verifier`` checks a payload made as ``producer``
    with (a payload that declares no profile: as if made like the verifier's own);
    ``UncalibratedPair`` when none were calibrated for that pair — the verifier then hands the
    audit on rather than judge it with the wrong ones. Thresholds are per ``model``
    (``model_key``; ``path`` overrides: ``thresholds_path``) and per dtype pair, calibrated on
    CPU: devices are not told apart yet."""
    made = producer.dtype if producer is not None else verifier.dtype
    pair = made if made == verifier.dtype else f"{made}>{verifier.dtype}"
    return load_thresholds(pair, path or thresholds_path(model))


@dataclass(frozen=True)
class Outcome:
    passed: bool
    failed_check: str = ""
    detail: str = ""
    stats: dict[str, float] = field(default_factory=dict)


class _Failed(Exception):
    def __init__(self, check: str, detail: str) -> None:
        super().__init__(detail)
        self.check, self.detail = check, detail


def verify_payload(
    lease: Lease,
    payload: RolloutPayload,
    env: Environment,
    tokenizer: Any,
    eos_ids: set[int],
    vocab_size: int,
    prefill: Prefill,
    thresholds: Thresholds,
    current_version: int | None = None,
    max_staleness: int = 0,
    claimed_tokens: int | None = None,
    regenerate: Regenerate | None = None,
    always_exact: bool = False,
) -> Outcome:
    """Every check on one payload; the first failure is the outcome (a bad rollout is data).
    ``vocab_size`` is the model's (its logits' width), ``eos_ids`` its end-of-sequence ids,
    ``claimed_tokens`` the completion tokens its receipt claimed (None: not checked),
    ``regenerate`` the producer's exact generation where the verifier can run it (None: the
    calibrated thresholds alone judge), with ``always_exact`` on every lease that passed (not
    only those that look off)."""
    stats: dict[str, float] = {"samples": float(len(payload.samples))}
    try:
        _structure(lease, payload, current_version, max_staleness, claimed_tokens)
        multi = isinstance(env, MultiTurnEnvironment)
        tokens = _termination(lease, payload, eos_ids, vocab_size, multi)
        examples = lease_examples(env, lease)
        episodes = _episodes(lease, payload, env, tokenizer, eos_ids, examples, tokens)
        _rewards(lease, payload, env, examples, episodes)
        _replay(lease, payload, tokenizer, examples, episodes, prefill, thresholds, stats)
        if regenerate is not None and (always_exact or _suspicious(stats, thresholds)):
            _exact(lease, payload, tokenizer, examples, tokens, regenerate, stats)
    except _Failed as f:
        return Outcome(False, f.check, f.detail, stats)
    return Outcome(True, stats=stats)


def _structure(
    lease: Lease,
    payload: RolloutPayload,
    current_version: int | None,
    max_staleness: int,
    claimed_tokens: int | None,
) -> None:
    try:
        check_shape(lease, payload)
    except DecodeError as e:
        raise _Failed("lease", str(e)) from None
    if claimed_tokens is not None:
        try:
            tokens = count_tokens(payload)
        except DecodeError:
            tokens = claimed_tokens  # arrays that do not pair up fail as termination below
        if tokens != claimed_tokens:
            raise _Failed(
                "token_count", f"receipt claims {claimed_tokens} completion tokens, payload "
                f"holds {tokens}",
            )  # fmt: skip
    version = payload.policy_version
    if version != lease.policy_version:
        raise _Failed(
            "policy_version", f"payload claims v{version}, lease is v{lease.policy_version}"
        )
    if (
        current_version is not None
        and not current_version - max_staleness <= version <= current_version
    ):
        raise _Failed(
            "policy_version",
            f"v{version} is outside the window [v{current_version - max_staleness}, "
            f"v{current_version}]",
        )
    for sample, seed in zip(payload.samples, sample_seeds(lease), strict=True):
        if sample.seed != seed:
            raise _Failed(
                "seed", f"sample {sample.sample_index} used seed {sample.seed}, not {seed}"
            )


def _termination(
    lease: Lease, payload: RolloutPayload, eos_ids: set[int], vocab: int, episodes: bool
) -> list[list[int]]:
    """Each sample's model tokens, checked turn by turn (an episode's turns but the last end at
    their end-of-sequence token: ``split_turns``; a single-turn sample has one turn)."""
    max_tokens = lease.sampling.max_tokens
    out = []
    for s in payload.samples:
        try:
            ids = sample_tokens(s)[0].tolist()
        except DecodeError as e:
            raise _Failed("termination", str(e)) from None
        where = f"sample {s.sample_index}"
        if not ids:
            raise _Failed("termination", f"{where} is empty")
        if max(ids) >= vocab:
            raise _Failed("termination", f"{where} has token id {max(ids)} >= vocabulary {vocab}")
        turns = split_turns(ids, eos_ids) if episodes else [ids]
        if len(turns) > lease.sampling.max_turns:
            raise _Failed("termination", f"{where} has {len(turns)} model turns, the lease "
                          f"allows {lease.sampling.max_turns}")  # fmt: skip
        for t, turn in enumerate(turns):
            at = f"{where} turn {t}" if episodes else where
            if len(turn) > max_tokens:
                raise _Failed("termination", f"{at} has {len(turn)} tokens, max is {max_tokens}")
            early = [i for i, tok in enumerate(turn[:-1]) if tok in eos_ids]
            if early:
                raise _Failed("termination", f"{at} has end-of-sequence at {early[0]}, not last")
        last = turns[-1]
        if s.finish_reason == "stop" and last[-1] not in eos_ids:
            raise _Failed("termination", f"{where} claims stop but does not end in EOS")
        if s.finish_reason == "length" and (len(last) != max_tokens or last[-1] in eos_ids):
            raise _Failed(
                "termination", f"{where} claims length with {len(last)} of {max_tokens} tokens"
            )
        out.append(ids)
    return out


def _episodes(
    lease: Lease,
    payload: RolloutPayload,
    env: Environment,
    tokenizer: Any,
    eos_ids: set[int],
    examples: list[Any],
    tokens: list[list[int]],
) -> list[Rebuilt]:
    """Every sample's episode rebuilt from its model turns; the environment turns it carries
    must be exactly those (a forged tool result, an edited turn, a turn after the end fail)."""
    out = []
    for k, (s, ids) in enumerate(zip(payload.samples, tokens, strict=True)):
        where = f"sample {s.sample_index}"
        try:
            rebuilt = rebuild(env, examples[k // lease.group_size], tokenizer, ids, eos_ids)
        except EpisodeMismatch as e:
            raise _Failed("env_turns", f"{where}: {e}") from None
        claimed, want = s.env_turns, rebuilt.env_turns
        for j, (a, b) in enumerate(zip(claimed, want, strict=False)):
            if a.after != b.after:
                raise _Failed("env_turns", f"{where} environment turn {j} is after model "
                              f"token {a.after}; the episode puts it after {b.after}")  # fmt: skip
            if a.token_ids != b.token_ids:
                got, exp = env_turn_tokens(a), env_turn_tokens(b)
                pos = next((i for i, (x, y) in enumerate(zip(got, exp, strict=False)) if x != y),
                           min(len(got), len(exp)))  # fmt: skip
                raise _Failed(
                    "env_turns",
                    f"{where} environment turn {j} is not what the environment answers (token "
                    f"{pos} of {len(got)}: {tokenizer.decode(got[pos : pos + 24])!r}, want "
                    f"{tokenizer.decode(exp[pos : pos + 24])!r})",
                )
        if len(claimed) != len(want):
            raise _Failed("env_turns", f"{where} carries {len(claimed)} environment turns, "
                          f"its episode has {len(want)}")  # fmt: skip
        out.append(rebuilt)
    return out


def _rewards(
    lease: Lease,
    payload: RolloutPayload,
    env: Environment,
    examples: list[Any],
    episodes: list[Rebuilt],
) -> None:
    for k, (s, episode) in enumerate(zip(payload.samples, episodes, strict=True)):
        reward = episode.score(env, examples[k // lease.group_size]).reward
        if not math.isfinite(s.reward) or abs(s.reward - reward) > REWARD_TOLERANCE:
            raise _Failed("reward", f"sample {s.sample_index} claims {s.reward}, scores {reward}")


def replay_sample(
    logits_T_V: torch.Tensor,
    ids: list[int],
    seed: int,
    claimed_logprobs: Any,
    temperature: float,
    top_p: float,
    slack: float = TOP_P_SLACK,
) -> tuple[Any, Any]:
    """Per position of one sample, from the logits the claimed model gives its tokens
    (``Prefill``): ``(replay margins [T], |claimed - recomputed| logprobs [T])``."""
    replay = replay_samples(
        [logits_T_V], [ids], [seed], [claimed_logprobs], temperature, top_p, slack
    )[0]
    return replay.margins, replay.diffs.abs()


class Replay(NamedTuple):
    """One sample's replay, per position."""

    margins: torch.Tensor
    """Best score the sampler could pick minus the committed token's (0: it is the pick)."""
    diffs: torch.Tensor
    """Claimed logprob minus the nearest an honest producer could have reported (float64,
    ``honest_logprobs``)."""
    elsewhere: torch.Tensor
    """Whether that nearest value puts the top-p boundary elsewhere than the verifier's own
    arithmetic does, and the verifier's own value is more than ``ELSEWHERE_SLACKS`` slacks
    away (bool): the room a claim inflated within ``top_p_slack`` hides in. Honest boundary
    flips move a logprob by about the slack (bf16: at most 2.0x on 32 leases)."""


def replay_samples(
    logits: list[torch.Tensor],
    ids: list[list[int]],
    seeds: list[int],
    claimed_logprobs: list[Any],
    temperature: float,
    top_p: float,
    slack: float = TOP_P_SLACK,
) -> list[Replay]:
    """Per sample, its ``Replay``, for many samples, computed over all their tokens at once.

    A claimed logprob is compared with the nearest an honest producer could have reported: at
    the top-p boundary, the tokens next to it may have been in the producer's set or not
    (``honest_logprobs``)."""
    sizes = [len(t) for t in ids]
    logits_N_V = torch.cat(logits) if logits else torch.zeros(0, 0)
    ids_N = torch.tensor([t for sample in ids for t in sample], dtype=torch.long)
    seeds_N = torch.tensor([s for s, n in zip(seeds, sizes, strict=True) for _ in range(n)],
                           dtype=torch.int64)  # fmt: skip
    positions_N = torch.tensor([p for n in sizes for p in range(n)], dtype=torch.int64)
    claimed_N = torch.cat([torch.as_tensor(c, dtype=torch.float64).view(-1)
                           for c in claimed_logprobs]) if ids else torch.zeros(0)  # fmt: skip
    if ids_N.numel() == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return [Replay(empty, empty, empty.bool()) for _ in ids]
    margins_N = replay_margins(logits_N_V, ids_N, seeds_N, temperature, top_p, positions_N, slack)
    honest_N_3 = honest_logprobs(logits_N_V, ids_N, temperature, top_p, slack)
    gaps_N_3 = (claimed_N.view(-1, 1) - honest_N_3).nan_to_num(nan=math.inf)
    nearest_N = gaps_N_3.abs().argmin(dim=-1, keepdim=True)
    diffs_N = gaps_N_3.gather(-1, nearest_N).view(-1)
    if not bool(torch.isfinite(diffs_N).all()):  # a token no honest set holds: its own logprob
        scale = temperature if temperature > 0 else 1.0
        untruncated_N = torch.log_softmax(logits_N_V.to(torch.float64) / scale, dim=-1)
        own_N = untruncated_N.gather(-1, ids_N.view(-1, 1)).view(-1)
        diffs_N = torch.where(torch.isfinite(diffs_N), diffs_N, claimed_N - own_N)
    own_gap_N = gaps_N_3[:, 0].abs()
    elsewhere_N = (nearest_N.view(-1) != 0) & (own_gap_N > ELSEWHERE_SLACKS * slack)
    return [
        Replay(*parts)
        for parts in zip(
            margins_N.split(sizes), diffs_N.split(sizes), elsewhere_N.split(sizes), strict=True
        )
    ]


def _replay(
    lease: Lease,
    payload: RolloutPayload,
    tokenizer: Any,
    examples: list[Any],
    episodes: list[Rebuilt],
    prefill: Prefill,
    thresholds: Thresholds,
    stats: dict[str, float],
) -> None:
    """Every model turn replayed with its seed (``turn_seed``) on the logits of one prefill of
    the sample's whole stream, environment turns included."""
    t, top_p = lease.sampling.temperature, lease.sampling.top_p
    prompts = [prompt_ids(tokenizer, ex.prompt) for ex in examples]
    stats["max_margin"] = stats["max_logprob_diff"] = 0.0
    claims = [sample_tokens(s)[1].copy() for s in payload.samples]
    for s, claimed in zip(payload.samples, claims, strict=True):
        if not bool(torch.isfinite(torch.from_numpy(claimed)).all()):
            raise _Failed("logprobs", f"sample {s.sample_index} has non-finite logprobs")
    logits = prefill([(prompts[k // lease.group_size], ep.stream) for k, ep in enumerate(episodes)])
    where: list[tuple[str, int]] = []  # per turn: the sample it is of, its first model token
    turn_logits, turn_ids, turn_seeds, turn_claims = [], [], [], []
    for s, ep, logits_T_V, claimed in zip(payload.samples, episodes, logits, claims, strict=True):
        sampled_T = torch.tensor(ep.sampled, dtype=torch.bool)
        model_logits = logits_T_V[sampled_T] if not bool(sampled_T.all()) else logits_T_V
        at = 0
        for k, turn in enumerate(ep.turns):
            label = f"sample {s.sample_index}" + (f" turn {k}" if len(ep.turns) > 1 else "")
            where.append((label, at))
            turn_logits.append(model_logits[at : at + len(turn)])
            turn_ids.append(turn)
            turn_seeds.append(turn_seed(s.seed, k))
            turn_claims.append(claimed[at : at + len(turn)])
            at += len(turn)
    replays = replay_samples(turn_logits, turn_ids, turn_seeds, turn_claims, t, top_p,
                             thresholds.top_p_slack)  # fmt: skip
    for (label, at), ids, claimed, (margins_T, signed_T, _) in zip(
        where, turn_ids, turn_claims, replays, strict=True
    ):
        if not ids:
            continue
        diff_T = signed_T.abs()
        stats["max_margin"] = max(stats["max_margin"], float(margins_T.max()))
        stats["max_logprob_diff"] = max(stats["max_logprob_diff"], float(diff_T.max()))
        if stats["max_margin"] > thresholds.max_margin:
            pos = int(margins_T.argmax())
            raise _Failed(
                "sampling_replay",
                f"{label} position {at + pos}: token {ids[pos]} is not the seeded "
                f"pick (margin {float(margins_T[pos]):.3g} > {thresholds.max_margin:g})",
            )
        if stats["max_logprob_diff"] > thresholds.max_logprob_diff:
            pos = int(diff_T.argmax())
            raise _Failed(
                "logprobs",
                f"{label} position {at + pos}: claimed logprob {claimed[pos]:.6g} is "
                f"off by {float(diff_T[pos]):.3g} (tolerance {thresholds.max_logprob_diff:g})",
            )
    _lease_statistics(replays, turn_claims, thresholds, stats)


def replaced_limit(tokens: int, rate: float, odds: float = 1e-6) -> int:
    """The most tokens of ``tokens`` an honest lease has off the seeded pick, at ``rate`` each:
    the smallest count a Poisson(tokens x rate) count exceeds with probability below ``odds``.

    >>> replaced_limit(100, 0.003), replaced_limit(1000, 0.003), replaced_limit(100, 1.0)
    (5, 14, 100)
    """
    if rate >= 1.0:
        return tokens
    mean = tokens * rate
    term = tail = math.exp(-mean)  # P(X = 0), then P(X <= k)
    k = 0
    while 1.0 - tail >= odds and k < tokens:
        k += 1
        term *= mean / k
        tail += term
    return k


def _lease_statistics(
    replays: list[Replay],
    claims: list[Any],
    thresholds: Thresholds,
    stats: dict[str, float],
) -> None:
    """The lease-wide checks: every token within its own limits, the lease not on average."""
    if not replays or sum(r.margins.numel() for r in replays) == 0:
        return
    margins_N = torch.cat([r.margins for r in replays])
    signed_N = torch.cat([r.diffs for r in replays])
    stats["mean_logprob_diff"] = mean = abs(float(signed_N.mean()))
    stats["rms_logprob_diff"] = rms = float(signed_N.pow(2).mean().sqrt())
    claimed_N = torch.cat([torch.as_tensor(c, dtype=torch.float64).view(-1) for c in claims])
    recomputed_N = claimed_N - signed_N
    unsure_N = signed_N[recomputed_N < UNCERTAIN_LOGPROB].abs()
    median = float(unsure_N.median()) if unsure_N.numel() >= MIN_UNCERTAIN else 0.0
    stats["median_logprob_diff"] = median
    n = margins_N.numel()
    replaced = int((margins_N > 0).sum())
    stats["replaced_fraction"], stats["tokens"] = replaced / n, float(n)
    stats["boundary_elsewhere"] = float(sum(int(r.elsewhere.sum()) for r in replays))
    limit = replaced_limit(n, thresholds.replaced_rate)
    if replaced > limit:
        raise _Failed(
            "sampling_replay",
            f"{replaced} of the lease's {n} tokens are not the seeded pick (honest work: at "
            f"most {limit} at a rate of {thresholds.replaced_rate:.2%})",
        )
    if mean > thresholds.max_mean_logprob_diff:
        raise _Failed(
            "logprobs",
            f"claimed logprobs are off the recomputed ones by {mean:.3g} nats a token on "
            f"average over the lease (honest work: under {thresholds.max_mean_logprob_diff:g})",
        )
    stats["drift"] = drift = math.sqrt(median * rms)
    if drift > thresholds.max_drift:
        raise _Failed(
            "logprobs",
            f"claimed logprobs drift from the recomputed ones by {drift:.3g} (a median "
            f"{median:.3g} nats over the lease's {unsure_N.numel()} uncertain tokens, "
            f"{rms:.3g} root mean square; honest work: under {thresholds.max_drift:g}): the "
            "model that sampled them is not the claimed one",
        )


def _suspicious(stats: dict[str, float], thresholds: Thresholds) -> bool:
    """Whether a lease that passed is worth an exact replay (``ESCALATE_AT``)."""
    off = stats.get("replaced_fraction", 0.0) > 0 or stats.get("boundary_elsewhere", 0.0) > 0
    return off or any(
        stats.get(name, 0.0) > ESCALATE_AT * limit
        for name, limit in (
            ("mean_logprob_diff", thresholds.max_mean_logprob_diff),
            ("drift", thresholds.max_drift),
        )
    )


def _exact(
    lease: Lease,
    payload: RolloutPayload,
    tokenizer: Any,
    examples: list[Any],
    tokens: list[list[int]],
    regenerate: Regenerate,
    stats: dict[str, float],
) -> None:
    """Every token and logprob exactly as the producer's profile generates them."""
    stats["exact_replay"] = 1.0
    again = regenerate()
    for s, ids, (want, logprobs) in zip(payload.samples, tokens, again, strict=True):
        if ids != want:
            pos = next(
                (i for i, (a, b) in enumerate(zip(ids, want, strict=False)) if a != b),
                min(len(ids), len(want)),
            )
            got = f"token {ids[pos]}" if pos < len(ids) else "the end"
            raise _Failed(
                "sampling_replay",
                f"exact replay: sample {s.sample_index} position {pos}: {got} where the "
                f"producer's profile samples {want[pos] if pos < len(want) else 'the end'}",
            )
        claimed = np.frombuffer(s.logprobs, dtype="<f4")
        exact = np.asarray(logprobs, dtype="<f4")
        if claimed.tobytes() != exact.tobytes():
            pos = int(np.flatnonzero(claimed != exact)[0])
            raise _Failed(
                "logprobs",
                f"exact replay: sample {s.sample_index} position {pos}: claimed logprob "
                f"{claimed[pos]:.8g}, the producer's profile gives {exact[pos]:.8g}",
            )
