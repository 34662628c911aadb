"""A run's bill and the network's ledger: who paid for each token and who earned it.

Runs are billed per token that moved the model, and only for tokens a party other than the
producer confirmed: the coordinator fetches every counted rollout's payload and counts it
(``coordinator/recount.py``), and only rollouts whose receipt matches that count are dealt to a
round. When a trainer reports a round whose recorded version it made (it signed the same
manifest), each confirmed rollout of its share is charged its sampled tokens (paid to the
rollout's producer), and the trainer is paid the same tokens again for training on them: the
tokens trained are what the coordinator dealt, never what a trainer says. A trainer whose
result lost to another group's, or that died, moved nothing, and nothing of its share is charged.
Verifiers are credited the tokens they checked, out of the network's account. A producer
penalized after its rollouts were paid for forfeits that credit back to the run's payer (the
*refund*: the key's usage goes down by as much), and the run redoes those examples. The journal
is double-entry — every entry moves tokens from one account to another, and ``(kind, ref)`` is
unique, so nothing is posted twice — over the accounts ``key:<name>`` (a researcher's API key),
``node:<peer id>`` and ``network``.

The money itself is the key's budget in the accounts database (``protocol/accounts/``), the
one the gateway meters requests against. Before a round is dealt the coordinator *holds* the
round's worst case (sampled + trained = 2 × the dealt rollouts' sampled tokens) of the owner's
budget under the holder ``run:<id>`` — the same atomic hold the gateways take, so a key's runs
and API requests together never overspend it — and settles each charge out of that hold with a
usage record (model ``run:<id>``). **No charge moves more than its round still holds**: one
that would is refused, logged and not posted. What a round held and did not spend goes back
once all its trainers' reports are in, or two rounds later (a trainer that died never reports).
A restarted coordinator gives back what the stopped one held and holds again what its open
rounds may still charge, before it answers anyone. A run whose next round does not fit its
key's budget or its own ``budget.max_tokens`` completes (``budget``).

``reconcile`` checks each run's charges against evidence no node can bend: the tokens in the
payloads themselves, counted again from the frames the coordinator kept (signed by their
producers and hashed into their receipts), and the signed recounts of the trainers that
trained on them; and the key's usage records against the charges less the refunds.
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
KINDS = (*CHARGES, "verified", "refund")
"""Every kind of journal entry."""


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
    opened_at: float = 0.0


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

    def restore(self, rows: Iterable[LedgerRow]) -> None:
        """Load the journal (before the open rounds are held again: ``reestablish``)."""
        for row in rows:
            self._journal(row)

    def reestablish(
        self, run: RunState, rounds: dict[int, list[LeaseState]], reported: dict[int, set[str]]
    ) -> None:
        """After a restart (blocking, before serving): give back what the stopped coordinator
        held for the run, then hold again what each open round (``rounds``: version → dealt
        rollouts) may still charge — its worst case less what it has charged — so no later
        charge finds nothing held."""
        run_id = run.run_id
        if self.accounts is not None:
            self.accounts.release_all(holder(run_id))
        if run.state != "running":
            return
        for version, dealt in sorted(rounds.items()):
            trainers = {s.trained_by for s in dealt if s.trained_by}
            done = reported.get(version, set())
            if trainers and trainers <= done:
                continue  # closed: every trainer reported
            refs = {s.lease_id for s in dealt} | {f"{run_id}:{version}:{t}" for t in trainers}
            charged = sum(e.tokens for e in self.entries
                          if e.kind in CHARGES and e.ref in refs)  # fmt: skip
            bill = RoundBill(held=2 * sum(s.completion_tokens for s in dealt), charged=charged,
                             trainers=trainers, reported=done & trainers,
                             opened_at=self.clock())  # fmt: skip
            left = bill.held - charged
            key = run.owner_key_id
            if left > 0 and self.accounts is not None and key is not None \
                    and not self.accounts.hold(holder(run_id), key, left):  # fmt: skip
                # the key's budget went elsewhere meanwhile: charge nothing more
                log.error("run %s round %d: %d tokens could not be held again; its charges "
                          "will be refused", run_id, version, left)  # fmt: skip
                bill.held = charged
            self.rounds[(run_id, version)] = bill

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
        self.rounds[(run_id, version)] = RoundBill(held=worst, opened_at=self.clock())
        return True

    def dealt(self, run_id: str, version: int, trainer: str) -> None:
        if bill := self.rounds.get((run_id, version)):
            bill.trainers.add(trainer)

    async def charge_round(
        self,
        run: RunState,
        version: int,
        trainer: str,
        share: list[LeaseState],
        pay_trainer: bool = True,
    ) -> list[LedgerRow]:
        """Charge what a trainer's round moved: each confirmed rollout of its share (sampled
        tokens, paid to its producer; a rollout rejected or quarantined since it was dealt is
        not charged), and the same tokens again for training on them, paid to the trainer
        (unless its report lied: ``pay_trainer`` off)."""
        run_id = run.run_id
        paid = [s for s in share if s.status == "completed" and s.counted and s.confirmed]
        charges = [("sampled", node(s.node), s.completion_tokens, s.lease_id) for s in paid]
        if pay_trainer:
            trained = sum(s.completion_tokens for s in paid)
            charges.append(("trained", node(trainer), trained, f"{run_id}:{version}:{trainer}"))
        bill = self.rounds.get((run_id, version))
        rows = []
        for kind, credit, tokens, ref in charges:
            if tokens <= 0 or (kind, ref) in self._posted:
                continue
            if bill is None or tokens > bill.held - bill.charged:
                log.error(
                    "run %s round %d: a %s charge of %d tokens (%s) is beyond what the round "
                    "holds (%d): refused", run_id, version, kind, tokens, ref,
                    bill.held - bill.charged if bill else 0, extra={"run_id": run_id},
                )  # fmt: skip
                continue
            bill.charged += tokens
            if row := self.post(run_id, kind, payer(run), credit, tokens, ref):
                rows.append(row)
        await self._settle(run, rows)
        return rows

    def reported(self, run: RunState, version: int, trainer: str) -> None:
        if bill := self.rounds.get((run.run_id, version)):
            bill.reported.add(trainer)

    async def close_reported(self, run: RunState) -> None:
        """Give back what rounds whose every trainer has reported held and did not spend."""
        await self._close(run, lambda v, b: b.trainers <= b.reported)

    async def close_unmade(self, run: RunState, committed: Callable[[int, str], bool]) -> None:
        """Give back at once what an ended run's rounds hold that made no version and that no
        trainer of theirs committed to (``committed(round, trainer)``): commitments are
        refused once a run has ended, so nothing can be charged to those rounds any more, and
        no trainer will report them. A round committed to before the end may still make its
        version; ``close_reported`` or ``close_overdue`` closes that one."""
        if run.state in ("queued", "running"):
            return
        made = run.policy_version
        await self._close(run, lambda v, b: v >= made
                          and not any(committed(v, t) for t in b.trainers))  # fmt: skip

    async def close_overdue(self, run: RunState, deadline_s: float) -> None:
        """Give back what an ended run's rounds opened ``deadline_s`` ago still hold: a trainer
        that has not reported by then never will (it died, or left)."""
        if run.state in ("queued", "running"):
            return
        since = self.clock() - deadline_s
        for (run_id, v), bill in self.rounds.items():
            if run_id == run.run_id and bill.opened_at <= since:
                log.warning("run %s round %d: no report from %s; its unspent hold given back",
                            run_id, v, sorted(bill.trainers - bill.reported) or "any trainer",
                            extra={"run_id": run_id})  # fmt: skip
        await self._close(run, lambda v, b: b.opened_at <= since)

    async def _settle(self, run: RunState, rows: list[LedgerRow]) -> None:
        """Write the key's usage records for these charges, each out of the run's hold."""
        if not rows or self.accounts is None or run.owner_key_id is None:
            return
        bills = [Bill(
            key_id=run.owner_key_id, charged=row.tokens, model=holder(run.run_id),
            prompt_tokens=0, completion_tokens=row.tokens, latency_ms=0.0,
            node=row.credit.removeprefix("node:"), status=200, created_at=row.at,
        ) for row in rows]  # fmt: skip
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

    def forfeit_verified(self, verifier: str, since: float) -> list[LedgerRow]:
        """A verifier caught lying gives back its credit for checks since ``since`` to the
        network's account (kind ``unverified``, one entry per check, never twice)."""
        account = node(verifier)
        paid = [e for e in self.entries
                if e.kind == "verified" and e.credit == account and e.at >= since]  # fmt: skip
        return [
            r
            for e in paid
            if (r := self.post(e.run_id, "unverified", account, NETWORK, e.tokens, e.ref))
        ]

    async def forfeit(
        self, run: RunState, producer: str, lease_ids: Iterable[str]
    ) -> list[LedgerRow]:
        """A penalized producer gives back what it was paid for these leases, to the run's
        payer: the key's usage for the run goes down by as much."""
        wanted = set(lease_ids)
        paid = {e.ref: e.tokens for e in self.entries if e.kind == "sampled" and e.ref in wanted}
        rows = [r for lease_id, tokens in paid.items()
                if (r := self.post(run.run_id, "refund", node(producer), payer(run), tokens,
                                   lease_id))]  # fmt: skip
        refunded = sum(r.tokens for r in rows)
        if refunded and self.accounts is not None and run.owner_key_id is not None:
            await trio.to_thread.run_sync(
                self.accounts.refund, run.owner_key_id, refunded, holder(run.run_id), producer
            )
        return rows

    async def forfeit_trained(
        self, run: RunState, trainer: str, rounds: Iterable[int]
    ) -> list[LedgerRow]:
        """A trainer caught lying gives back what it was paid for training these rounds (their
        versions were withdrawn), to the run's payer."""
        refs = {f"{run.run_id}:{v}:{trainer}" for v in rounds}
        paid = {e.ref: e.tokens for e in self.entries if e.kind == "trained" and e.ref in refs}
        account, to = node(trainer), payer(run)
        rows = [r for ref, tokens in paid.items()
                if (r := self.post(run.run_id, "refund", account, to, tokens, ref))]  # fmt: skip
        refunded = sum(r.tokens for r in rows)
        if refunded and self.accounts is not None and run.owner_key_id is not None:
            await trio.to_thread.run_sync(
                self.accounts.refund, run.owner_key_id, refunded, holder(run.run_id), trainer
            )
        return rows

    def refunded(self, run_id: str) -> int:
        return self._sums.get((run_id, "refund"), 0)

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
        dealt: Iterable[LeaseState],
        reports: Iterable[ReportRow],
        usage: int | None,
        count: Callable[[LeaseState], int | None],
    ) -> dict[str, Any]:
        """A run's charges against the evidence: ``count`` gives the tokens of a rollout's
        payload as the reconciler counts them itself from the kept frame (None: no longer
        kept); ``reconciled`` when every charge equals it and the key's usage records equal
        the charges less the refunds. The trainers' signed counts of the rollouts they trained
        on are a second, independent count: shown, and the rollouts where one disagrees with
        the payload listed (``disputed_by_trainers``; that trainer was not paid)."""
        run_id = run.run_id
        by_id = {s.lease_id: s for s in dealt if s.run_id == run_id}
        sampled_refs = [e.ref for e in self.entries if e.run_id == run_id and e.kind == "sampled"]
        trained_refs = [e.ref for e in self.entries if e.run_id == run_id and e.kind == "trained"]
        counts = {lease_id: count(by_id[lease_id]) if lease_id in by_id else None
                  for lease_id in sampled_refs}  # fmt: skip
        missing = sorted(lease_id for lease_id, n in counts.items() if n is None)
        recounted = sum(n or 0 for n in counts.values())
        trained = 0
        for ref in trained_refs:
            version, trainer = ref.removeprefix(f"{run_id}:").split(":", 1)
            trained += sum(counts.get(s.lease_id) or 0 for s in by_id.values()
                           if s.trained_in == int(version) and s.trained_by == trainer
                           and s.lease_id in counts)  # fmt: skip
        signed: dict[str, int] = {}
        for r in reports:
            signed.update({c["lease_id"]: c["tokens"] for c in r.counts})
        trainer_counted = sum(signed.get(lease_id, 0) for lease_id in sampled_refs)
        disputed = sorted(i for i in sampled_refs if i in signed and signed[i] != counts[i])
        charged = {k: self.charged(run_id, k) for k in CHARGES}
        total, refunded = charged["sampled"] + charged["trained"], self.refunded(run_id)
        return {
            "run": run_id, "owner": run.owner, "charged_sampled": charged["sampled"],
            "charged_trained": charged["trained"], "charged": total, "refunded": refunded,
            "recounted_sampled": recounted, "recounted_trained": trained,
            "recounted": recounted + trained,
            "trainer_counted_sampled": trainer_counted, "disputed_by_trainers": disputed,
            "evidence_missing": missing, "key_usage": usage,
            "reconciled": not missing and charged["sampled"] == recounted
            and charged["trained"] == trained and usage in (None, total - refunded),
        }  # fmt: skip
