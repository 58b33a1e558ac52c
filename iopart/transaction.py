"""Transactions on the resource database: the only way it changes.

A transaction is begun, given steps, and committed or aborted, possibly across
several messages. Each step is applied at once (so later steps see earlier ones)
and its inverse is kept. A refused step rolls the whole transaction back. Commit
queues an audit record. `flush()` writes every queued record durably with one
commit, and only then are those transactions acknowledged. If that write fails,
they are undone, newest first.

Isolation is by the simplest rule that is always right: a transaction open across
messages holds the database until it ends, and any other transaction meanwhile is
refused with EBUSY. Messages are processed one at a time, so a transaction carried
whole in one message never interleaves with another. Committed transactions thus
never depend on uncommitted ones, and replaying the log in order rebuilds exactly
the same database.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from iopart.auditlog import AuditLog, AuditRecord
from iopart.resources import RefusedError, ResourceDB, Undo, parse_op

MAX_STEPS = 256


@dataclass
class PendingTx:
    txid: int
    origin: str
    ops: list[dict[str, Any]] = field(default_factory=list)
    undo: list[Undo] = field(default_factory=list)

    def rollback(self) -> None:
        while self.undo:
            self.undo.pop()()


class TransactionManager:
    """Applies transaction messages to a ResourceDB, logging them in an AuditLog."""

    def __init__(self, db: ResourceDB, log: AuditLog) -> None:
        self.db = db
        self.log = log
        self.pending: dict[tuple[str, int], PendingTx] = {}
        self.holder: PendingTx | None = None
        self._queued: list[tuple[PendingTx, AuditRecord]] = []
        self.committed = 0
        self.refused = 0
        self.rolled_back = 0

    # -- the steps of one transaction
    def begin(self, origin: str, txid: int) -> PendingTx:
        key = (origin, txid)
        if key in self.pending:
            raise RefusedError(
                f"transaction {txid} of {origin} is already open", field="tx", errno=errno.EEXIST
            )
        if self.holder is not None:
            h = self.holder
            raise RefusedError(
                f"the database is held by open transaction {h.txid} of {h.origin}",
                field="tx",
                errno=errno.EBUSY,
            )
        tx = self.pending[key] = self.holder = PendingTx(txid, origin)
        return tx

    def step(self, tx: PendingTx, raw: Any) -> None:
        """Apply one step; on refusal the whole transaction is rolled back and logged."""
        try:
            if len(tx.ops) >= MAX_STEPS:
                raise RefusedError(
                    f"a transaction has at most {MAX_STEPS} steps", field="steps", errno=errno.E2BIG
                )
            op = parse_op(raw)
            undo = self.db.apply(op)
        except RefusedError as exc:
            self._end(tx)
            tx.rollback()
            self.refused += 1
            self._queue(tx, "refused", {"error": exc.to_dict(), "step": len(tx.ops)})
            raise
        tx.undo.append(undo)
        tx.ops.append(op.to_dict())

    def commit(self, tx: PendingTx) -> None:
        """Queue the transaction's record; it is acknowledged after flush()."""
        self._end(tx)
        self.committed += 1
        self._queue(tx, "committed", {})

    def abort(self, tx: PendingTx) -> None:
        self._end(tx)
        tx.rollback()
        self.rolled_back += 1
        self._queue(tx, "rolled_back", {"reason": "aborted by its origin"})

    def rollback_origin(self, origin: str) -> int:
        """Roll back every open transaction of a failed partition, newest first."""
        txs = sorted(
            (t for (o, _), t in self.pending.items() if o == origin),
            key=lambda t: t.txid,
            reverse=True,
        )
        for tx in txs:
            self._end(tx)
            tx.rollback()
            self.rolled_back += 1
            self._queue(tx, "rolled_back", {"reason": f"{origin} failed"})
        return len(txs)

    def lookup(self, origin: str, txid: int) -> PendingTx:
        tx = self.pending.get((origin, txid))
        if tx is None:
            raise RefusedError(
                f"no open transaction {txid} of {origin}", field="tx", errno=errno.ENOENT
            )
        return tx

    # -- durability
    def flush(self) -> list[int]:
        """Durably log every queued record in one commit; returns their seq numbers.

        On failure the committed transactions of the group are undone (newest first)
        and the error propagates: nothing of the group is acknowledged."""
        group, self._queued = self._queued, []
        try:
            return self.log.append([rec for _, rec in group])
        except BaseException:
            for tx, rec in reversed(group):
                if rec.outcome == "committed":
                    tx.rollback()
                    self.committed -= 1
            raise

    def _end(self, tx: PendingTx) -> None:
        self.pending.pop((tx.origin, tx.txid), None)
        if self.holder is tx:
            self.holder = None

    def _queue(self, tx: PendingTx, outcome: str, result: dict[str, Any]) -> None:
        self._queued.append((tx, AuditRecord(tx.txid, tx.origin, outcome, list(tx.ops), result)))

    # -- one message
    def handle(self, origin: str, msg: Any) -> dict[str, Any]:
        """Process one transaction message; the reply is final after flush().

        A message is {"tx": id, "begin"?: true, "steps"?: [...], "commit"?: true,
        "abort"?: true}. A message with steps and commit is a whole transaction;
        otherwise a transaction must be opened with "begin", and later messages
        must find it open (after a rollback they get ENOENT, never a partial
        commit)."""
        if not isinstance(msg, dict) or not isinstance(msg.get("tx"), int):
            raise RefusedError("a transaction message needs an integer 'tx'", field="tx")
        unknown = set(msg) - {"tx", "begin", "steps", "commit", "abort"}
        if unknown:
            raise RefusedError(
                f"unknown message field(s) {', '.join(sorted(unknown))}", field=sorted(unknown)[0]
            )
        txid: int = msg["tx"]
        steps = msg.get("steps", [])
        try:
            if not isinstance(steps, list):
                raise RefusedError("steps must be a list of operations", field="steps")
            whole = (origin, txid) not in self.pending and "steps" in msg and msg.get("commit")
            opening = msg.get("begin") or whole
            tx = self.begin(origin, txid) if opening else self.lookup(origin, txid)
        except RefusedError as exc:
            # refused before it could open: logged all the same
            rec = AuditRecord(txid, origin, "refused", [], {"error": exc.to_dict()})
            self._queued.append((PendingTx(txid, origin), rec))
            self.refused += 1
            raise
        if msg.get("abort"):
            self.abort(tx)
            return {"tx": txid, "state": "rolled_back"}
        for raw in steps:
            self.step(tx, raw)
        if msg.get("commit"):
            self.commit(tx)
            return {"tx": txid, "state": "committed"}
        return {"tx": txid, "state": "open", "steps": len(tx.ops)}


class ReplayError(Exception):
    """The audit log does not replay: the log or the code is inconsistent."""


def replay(db: ResourceDB, log: AuditLog) -> int:
    """Apply every committed record of `log` to `db` in order; returns the count."""
    n = 0
    for rec in log.records(committed_only=True):
        for raw in rec.ops:
            try:
                db.apply(parse_op(raw))
            except RefusedError as exc:
                raise ReplayError(f"audit record {rec.seq} does not replay: {exc}") from exc
        n += 1
    return n
