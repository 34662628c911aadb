"""A run's bill and the network's ledger: who paid for each token and who earned it.

Runs are billed per token that moved the model: when a trainer reports a round whose recorded
version it made (it signed the same manifest), the sampled tokens of the rollouts of its share
and the tokens it trained on are charged. Each charge is also a credit, to the rollout's
producer or to the trainer; a trainer whose result lost to another group's, or that died, moved
nothing, and nothing of its share is charged. Verifiers are credited the tokens they checked,
out of the network's account; a producer penalized after its rollouts were paid for forfeits
that credit to the network. The journal is double-entry — every entry moves tokens from one
account to another, and ``(kind, ref)`` is unique, so nothing is posted twice — over the
accounts ``key:<name>`` (a researcher's API key), ``node:<peer id>`` and ``network``.

The money itself is the key's budget in the accounts database (``protocol/accounts/``), the
one the gateway meters requests against. Before a round is dealt the coordinator *holds* the
round's worst case (sampled + trained ≤ 2 × the dealt rollouts' sampled tokens) of the owner's
budget under the holder ``run:<id>`` — the same atomic hold the gateways take, so a key's runs
and API requests together never overspend it — and settles each charge out of that hold with a
usage record (model ``run:<id>``). What a round held and did not spend goes back once all its
trainers' reports are in, or two rounds later (a trainer that died never reports). A run whose
next round does not fit its key's budget or its own ``budget.max_tokens`` completes
(``budget``).

``reconcile`` checks, per run, that the journal's charges equal the tokens processed — counted
again from the lease records (which trainer's share each was) and the reports, for trainers
that signed the version their round made — and equal the key's usage records for the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from coordinator.db import LeaseState, LedgerRow, ReportRow, RunState
from protocol.accounts import Bill, KeyStore

log = logging.getLogger(__name__)

NETWORK = "network"
CHARGES = ("sampled", "trained")


def payer(run: RunState) -> str:
    return f"key:{run.owner or '-'}"


def node(peer: str) -> str:
    return f"node:{peer}"


def holder(run_id: str) -> str:
    """The run's name as a holder of budget in the accounts database."""
    return f"run:{run_id}"


@dataclass
class RoundBill:
    """What one round of a run held of its owner's budget, and what it has charged."""

    held: int
    charged: int = 0
    trainers: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)


class Billing:
    def __init__(
        self,
        accounts: KeyStore | None,
        clock: Callable[[], float] = time.time,
        keep: Callable[[object], None] | None = None,
    ) -> None:
        self.accounts = accounts
        """The accounts database, or None on a network without keys (the journal is kept)."""
        self.clock = clock
        self.keep = keep or (lambda entity: None)
        """Where new journal entries go (the state's session)."""
        self.entries: list[LedgerRow] = []
        self._posted: set[tuple[str, str]] = set()
        self._sums: dict[tuple[str, str], int] = {}  # (run, kind) -> tokens
        self.rounds: dict[tuple[str, int], RoundBill] = {}

    def restore(self, rows: Iterable[LedgerRow], runs: Iterable[RunState]) -> None:
        """Load the journal; give back what runs held when the coordinator stopped (a charge
        that then finds no hold is still charged and recorded)."""
        for row in rows:
            self._journal(row)
        if self.accounts is not None:
            for run in runs:
                self.accounts.release_all(holder(run.run_id))

    # -- the journal ----------------------------------------------------------------------------

    def post(
        self, run_id: str, kind: str, debit: str, credit: str, tokens: int, ref: str
    ) -> LedgerRow | None:
        """Add an entry; None if ``(kind, ref)`` was posted before or it moves nothing."""
        if tokens <= 0 or (kind, ref) in self._posted:
            return None
        row = LedgerRow(run_id=run_id, kind=kind, debit=debit, credit=credit, tokens=tokens,
                        ref=ref, at=self.clock())  # fmt: skip
        self._journal(row)
        self.keep(row)
        return row

    def _journal(self, row: LedgerRow) -> None:
        self.entries.append(row)
        self._posted.add((row.kind, row.ref))
        key = (row.run_id, row.kind)
        self._sums[key] = self._sums.get(key, 0) + row.tokens

    def charged(self, run_id: str, kind: str | None = None) -> int:
        return sum(self._sums.get((run_id, k), 0) for k in ((kind,) if kind else CHARGES))

    def balances(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.debit] = out.get(e.debit, 0) - e.tokens
            out[e.credit] = out.get(e.credit, 0) + e.tokens
        return out

    # -- a run's rounds -------------------------------------------------------------------------

    def outstanding(self, run_id: str) -> int:
        """Tokens the run holds and has not charged yet."""
        return sum(max(b.held - b.charged, 0) for (r, _), b in self.rounds.items() if r == run_id)

    async def admit_round(self, run: RunState, version: int, dealt: list[LeaseState]) -> bool:
        """Hold the worst case of the round about to be dealt; False if the run's own budget or
        its owner's key cannot cover it (the run should complete)."""
        run_id = run.run_id
        await self._close(run, lambda v, b: v <= version - 2)
        worst = 2 * sum(s.completion_tokens for s in dealt)
        cap = run.plan.spec.budget.max_tokens
        if cap is not None and self.charged(run_id) + self.outstanding(run_id) + worst > cap:
            return False
        if self.accounts is not None and run.owner_key_id is not None:
            held = await trio.to_thread.run_sync(
                self.accounts.hold, holder(run_id), run.owner_key_id, worst
            )
            if not held:
                return False
        self.rounds[(run_id, version)] = RoundBill(held=worst)
        return True

    def dealt(self, run_id: str, version: int, trainer: str) -> None:
        if bill := self.rounds.get((run_id, version)):
            bill.trainers.add(trainer)

    async def charge_round(
        self, run: RunState, version: int, trainer: str, share: list[LeaseState], trained: int
    ) -> list[LedgerRow]:
        """Charge what a trainer's round moved: its share's sampled tokens, each paid to the
        rollout's producer, and the tokens it trained on, paid to it."""
        run_id = run.run_id
        rows = [r for s in share
                if (r := self.post(run_id, "sampled", payer(run), node(s.node),
                                   s.completion_tokens, s.lease_id))]  # fmt: skip
        if r := self.post(run_id, "trained", payer(run), node(trainer), trained,
                          f"{run_id}:{version}:{trainer}"):  # fmt: skip
            rows.append(r)
        await self._settle(run, version, rows)
        return rows

    def reported(self, run: RunState, version: int, trainer: str) -> None:
        if bill := self.rounds.get((run.run_id, version)):
            bill.reported.add(trainer)

    async def close_reported(self, run: RunState) -> None:
        """Give back what rounds whose every trainer has reported held and did not spend."""
        await self._close(run, lambda v, b: b.trainers <= b.reported)

    async def _settle(self, run: RunState, version: int, rows: list[LedgerRow]) -> None:
        bill = self.rounds.get((run.run_id, version))
        bills = []
        for row in rows:
            from_hold = max(min(row.tokens, bill.held - bill.charged), 0) if bill else 0
            if bill:
                bill.charged += row.tokens
            if run.owner_key_id is not None:
                bills.append(Bill(
                    key_id=run.owner_key_id, charged=from_hold, model=holder(run.run_id),
                    prompt_tokens=0, completion_tokens=row.tokens, latency_ms=0.0,
                    node=row.credit.removeprefix("node:"), status=200, created_at=row.at,
                ))  # fmt: skip
        if bills and self.accounts is not None:
            await trio.to_thread.run_sync(self.accounts.settle_many, holder(run.run_id), bills)

    async def _close(self, run: RunState, which: Callable[[int, RoundBill], bool]) -> None:
        run_id = run.run_id
        for key in [k for k, b in self.rounds.items() if k[0] == run_id and which(k[1], b)]:
            bill = self.rounds.pop(key)
            left = bill.held - bill.charged
            if left > 0 and self.accounts is not None and run.owner_key_id is not None:
                await trio.to_thread.run_sync(
                    self.accounts.release, holder(run_id), run.owner_key_id, left
                )

    # -- credits outside a run's bill -----------------------------------------------------------

    def credit_verified(
        self, run_id: str, audit_id: str, verifier: str, tokens: int
    ) -> LedgerRow | None:
        return self.post(run_id, "verified", NETWORK, node(verifier), tokens,
                         f"{audit_id}:{verifier}")  # fmt: skip

    def forfeit(self, run_id: str, producer: str, lease_ids: Iterable[str]) -> list[LedgerRow]:
        """A penalized producer gives back what it was paid for these leases."""
        wanted = set(lease_ids)
        paid = {e.ref: e.tokens for e in self.entries if e.kind == "sampled" and e.ref in wanted}
        return [r for lease_id, tokens in paid.items()
                if (r := self.post(run_id, "forfeit", node(producer), NETWORK, tokens,
                                   lease_id))]  # fmt: skip

    async def key_usage(self, run: RunState) -> int | None:
        """The tokens of the owner key's usage records for the run (None: no key)."""
        if self.accounts is None or run.owner_key_id is None:
            return None
        return await trio.to_thread.run_sync(
            self.accounts.usage_tokens, run.owner_key_id, holder(run.run_id)
        )

    # -- views ----------------------------------------------------------------------------------

    def reconcile(
        self,
        run: RunState,
        leases: Iterable[LeaseState],
        reports: Iterable[ReportRow],
        signers: dict[int, list[str]],
        usage: int | None,
    ) -> dict[str, Any]:
        """A run's charges in the journal against the tokens processed (recounted from the
        lease records and the reports, for trainers that reported a round and signed the version
        it made; a round made but not reported yet is neither charged nor counted) and the key's
        usage records for the run; ``reconciled`` when all agree."""
        run_id = run.run_id
        reports = list(reports)
        # a round's share is billed when its trainer reports, for a version it made
        billed = {
            (r.round, r.trainer) for r in reports if r.trainer in signers.get(r.round + 1, ())
        }
        sampled = sum(s.completion_tokens for s in leases if s.run_id == run_id
                      and (s.trained_in, s.trained_by) in billed)  # fmt: skip
        trained = sum(r.tokens_trained for r in reports if (r.round, r.trainer) in billed)
        charged = {k: self.charged(run_id, k) for k in CHARGES}
        total = charged["sampled"] + charged["trained"]
        return {
            "run": run_id, "owner": run.owner, "charged_sampled": charged["sampled"],
            "charged_trained": charged["trained"], "charged": total,
            "processed_sampled": sampled, "processed_trained": trained,
            "processed": sampled + trained, "key_usage": usage,
            "reconciled": total == sampled + trained and usage in (None, total),
        }  # fmt: skip
