"""Seeded Gumbel-max sampling that a verifier can replay exactly.

Sampling a token is ``argmax(logits / T + g)`` where ``g`` is Gumbel noise over the whole
vocabulary. Here the noise is not drawn from a stateful generator: it is a pure function of
(sample seed, position, token id) — splitmix64 hashing on int64 tensors, the same integers on any
device — so a verifier given the model, the adapter and the seed recomputes the exact noise at
every position with one prefill, and checks that each committed token is the one the sampler
picks. The seed itself is derived from values the node cannot choose: the lease's coordinator
randomness, the sample's index and the policy version.

Top-p keeps the smallest set of tokens whose probability reaches ``top_p`` (at least one; tokens
of equal probability are kept or dropped together, whatever order a sort leaves them in) and
samples among them; the reported logprob is the sampled token's under that (tempered, truncated)
distribution — the behaviour policy trainers correct for. ``T = 0`` is greedy.

>>> import torch
>>> logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
>>> a = sample(logits, torch.tensor([7]), torch.tensor([0]), temperature=1.0, top_p=1.0)
>>> b = sample(logits, torch.tensor([7]), torch.tensor([0]), temperature=1.0, top_p=1.0)
>>> bool((a[0] == b[0]).all())
True
"""

from __future__ import annotations

import torch

from verification.seeds import derive_seed  # noqa: F401  (callers import it from here too)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_POS_MUL = _signed(0xD1B54A32D192ED03)


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer; int64 multiplication wraps, as the algorithm wants."""
    z = z + _GOLDEN
    z = (z ^ _lsr(z, 30)) * _M1
    z = (z ^ _lsr(z, 27)) * _M2
    return z ^ _lsr(z, 31)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise ``[B, V]`` (float64) for each row's (seed, position), over the vocabulary."""
    seeds = seeds.to(torch.int64).view(-1, 1)
    positions = positions.to(device=seeds.device, dtype=torch.int64).view(-1, 1)
    row_key = _mix(seeds ^ (positions * _POS_MUL))
    tokens = torch.arange(vocab, device=seeds.device, dtype=torch.int64).view(1, -1)
    bits = _lsr(_mix(row_key + tokens), 11)  # 53 random bits
    uniform = (bits.to(torch.float64) + 0.5) * (2.0**-53)  # strictly inside (0, 1)
    return -torch.log(-torch.log(uniform))


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probabilities ``[B, V]`` of the distribution actually sampled from (-inf outside)."""
    logits = logits.to(torch.float32)
    if temperature <= 0:
        return torch.log_softmax(logits, dim=-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return logp
    sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
    # keep a token if the mass of the tokens more probable than it is below top_p (so the first
    # is always kept)
    keep_sorted = _mass_above(sorted_logp.exp()) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    truncated = logp.masked_fill(~keep, float("-inf"))
    return truncated - torch.logsumexp(truncated, dim=-1, keepdim=True)


def _mass_above(sorted_p_B_V: torch.Tensor) -> torch.Tensor:
    """Per token of rows sorted by descending probability: the mass of the tokens strictly more
    probable. Tied tokens get the same value, so which of them top-p keeps does not depend on
    the order a sort happened to leave them in — in bf16, where many logits are exactly equal,
    an unstable sort put one tied token in the producer's set and its twin in the verifier's."""
    before = torch.cumsum(sorted_p_B_V, dim=-1) - sorted_p_B_V
    starts = torch.ones_like(sorted_p_B_V, dtype=torch.bool)
    starts[..., 1:] = sorted_p_B_V[..., 1:] != sorted_p_B_V[..., :-1]
    index = torch.arange(sorted_p_B_V.shape[-1], device=sorted_p_B_V.device)
    run_start = torch.cummax(torch.where(starts, index, 0), dim=-1).values
    return before.gather(-1, run_start)


def sample(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    temperature: float,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: ``(token ids [B], their logprobs [B])``."""
    logp = sampling_logprobs(logits, temperature, top_p)
    if temperature <= 0:
        tokens = torch.argmax(logits, dim=-1)
    else:
        scores = logp.to(torch.float64) + gumbel_noise(seeds, positions, logits.shape[-1]).to(
            logp.device
        )
        tokens = torch.argmax(scores, dim=-1)
    return tokens, logp.gather(-1, tokens.view(-1, 1)).view(-1)


TOP_P_SLACK = 0.01
"""Probability mass at the top-p boundary within which a low-precision replay may disagree with
the producer on whether a token was in the set (bf16 carries about three digits)."""


def _kept(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The tokens top-p keeps at ``top_p`` (the first always), in the logits' own arithmetic."""
    logp = torch.log_softmax(logits.to(torch.float32) / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.ones_like(logp, dtype=torch.bool)
    sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
    keep_sorted = _mass_above(sorted_logp.exp()) < max(top_p, 0.0)
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _surely_kept(
    logits: torch.Tensor, temperature: float, top_p: float, slack: float = TOP_P_SLACK
) -> torch.Tensor:
    """Tokens inside the top-p set with room to spare: the mass of the tokens more probable below
    ``top_p − slack`` (the first is always kept; every token when ``top_p`` keeps them all)."""
    return _kept(logits, temperature, top_p if top_p >= 1.0 else top_p - slack)


def honest_logprobs(
    logits_N_V: torch.Tensor,
    tokens_N: torch.Tensor,
    temperature: float,
    top_p: float,
    slack: float = TOP_P_SLACK,
) -> torch.Tensor:
    """The logprobs (float64, ``[N, 3]``, NaN where not possible) an honest producer whose
    arithmetic differs from these logits' may report for each committed token: under this top-p
    set, under it with the next tokens (equally probable ones go together) added, or with its
    last ones dropped — a boundary within ``slack`` of probability mass of them may fall on
    either side of them, and that one flip moves the reported logprob by hundredths of a nat in
    bf16. Any other value is not what an honest producer reports, however close."""
    logits = logits_N_V.to(torch.float32)
    tokens = tokens_N.view(-1, 1).to(logits.device)
    if temperature <= 0 or top_p >= 1.0:
        exact = sampling_logprobs(logits, temperature, top_p).to(torch.float64)
        nan = torch.full_like(tokens, float("nan"), dtype=torch.float64).view(-1)
        return torch.stack([exact.gather(-1, tokens).view(-1), nan, nan], dim=-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    own = logp.to(torch.float64).gather(-1, tokens).view(-1)
    sorted_p, order = torch.sort(logp.exp(), dim=-1, descending=True)
    above = _mass_above(sorted_p)
    above_tok = torch.zeros_like(above).scatter(-1, order, above).gather(-1, tokens).view(-1)
    kept = above < top_p
    kept[..., 0] = True
    count = kept.sum(dim=-1, keepdim=True)  # a prefix: mass above never falls down the order
    last = above.gather(-1, count - 1).view(-1)  # the last kept group's mass above
    nxt = above.gather(-1, count.clamp(max=above.shape[-1] - 1)).view(-1)
    p64 = sorted_p.to(torch.float64)
    z = (p64 * kept).sum(-1)
    z_next = (p64 * (above == nxt.view(-1, 1))).sum(-1)
    z_last = (p64 * (above == last.view(-1, 1))).sum(-1)
    mine_kept, mine_next = above_tok <= last, above_tok == nxt
    nan = torch.full_like(own, float("nan"))
    here = torch.where(mine_kept, own - z.log(), nan)
    more = torch.where(
        (nxt < top_p + slack) & (count.view(-1) < above.shape[-1]) & (mine_kept | mine_next),
        own - (z + z_next).log(), nan,
    )  # fmt: skip
    fewer = torch.where(
        (last >= top_p - slack) & (last > 0) & (above_tok < last), own - (z - z_last).log(), nan
    )
    return torch.stack([here, more, fewer], dim=-1)


def replay_margins(
    logits_T_V: torch.Tensor,
    tokens_T: torch.Tensor,
    seed: int | torch.Tensor,
    temperature: float,
    top_p: float,
    positions_T: torch.Tensor | None = None,
    slack: float = TOP_P_SLACK,
) -> torch.Tensor:
    """For a committed completion: at each position, the best score among the tokens the sampler
    could pick minus the committed token's score (0 where the committed token is the pick).

    Scores are tempered log-probabilities plus the seeded noise; top-p only decides which tokens
    compete (renormalizing shifts them all alike). The committed token is scored even when it
    falls outside the recomputed top-p set, so a token at the boundary — kept by the producer's
    arithmetic, just dropped by the verifier's — gets a small finite margin, not an infinite one.
    The other way round, a token the producer's arithmetic just dropped competes only if it is
    clearly inside the set (``slack`` of mass inside the boundary): with a large draw of noise it
    would otherwise outscore the honest pick by whole nats.

    Several samples replay at once when ``seed`` holds each row's seed and ``positions_T`` each
    row's position in its own sample (default: one sample, positions 0, 1, ...).
    """
    logits = logits_T_V.to(torch.float32)
    positions = torch.arange(tokens_T.shape[0]) if positions_T is None else positions_T
    if temperature <= 0:
        scores = torch.log_softmax(logits, dim=-1).to(torch.float64)
        candidates = scores
    else:
        seeds = torch.full_like(positions, seed) if isinstance(seed, int) else seed
        noise = gumbel_noise(seeds, positions, logits.shape[-1])
        scores = torch.log_softmax(logits / temperature, dim=-1).to(torch.float64)
        scores = scores + noise.to(scores.device)
        kept = _surely_kept(logits, temperature, top_p, slack)
        candidates = scores.masked_fill(~kept, float("-inf"))
    chosen = scores.gather(-1, tokens_T.view(-1, 1).to(scores.device)).view(-1)
    return candidates.max(dim=-1).values - chosen
