"""The audit log: every processed transaction, durable before it is acknowledged.

SQLite in WAL mode with synchronous=FULL, in the state directory. Records are
appended in groups: one SQLite commit (one fsync) covers every transaction of a
batch, and none of them is acknowledged before that commit returns. The committed
records, replayed in order, rebuild the resource database.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
create table if not exists audit (
    seq     integer primary key,
    txid    integer not null,
    origin  text    not null,
    ts      real    not null,
    outcome text    not null check (outcome in ('committed', 'refused', 'rolled_back')),
    ops     text    not null,
    result  text    not null
);
"""


@dataclass(frozen=True)
class AuditRecord:
    txid: int
    origin: str
    outcome: str
    ops: list[dict[str, Any]]
    result: dict[str, Any]
    seq: int = 0
    ts: float = 0.0


class AuditLog:
    """Append-only log of processed transactions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("pragma journal_mode=wal")
        self.db.execute("pragma synchronous=full")
        self.db.executescript(SCHEMA)

    def append(self, records: Sequence[AuditRecord]) -> list[int]:
        """Durably append a group of records (one commit); returns their sequence numbers."""
        if not records:
            return []
        now = time.time()
        seqs: list[int] = []
        cur = self.db.cursor()
        cur.execute("begin immediate")
        try:
            for r in records:
                cur.execute(
                    "insert into audit (txid, origin, ts, outcome, ops, result) "
                    "values (?, ?, ?, ?, ?, ?)",
                    (r.txid, r.origin, now, r.outcome, json.dumps(r.ops), json.dumps(r.result)),
                )
                seqs.append(int(cur.lastrowid or 0))
            cur.execute("commit")
        except BaseException:
            cur.execute("rollback")
            raise
        return seqs

    def records(
        self, *, committed_only: bool = False, since: int = 0, limit: int = -1
    ) -> Iterator[AuditRecord]:
        q = "select seq, txid, origin, ts, outcome, ops, result from audit where seq > ?"
        if committed_only:
            q += " and outcome = 'committed'"
        q += " order by seq limit ?"
        for seq, txid, origin, ts, outcome, ops, result in self.db.execute(q, (since, limit)):
            yield AuditRecord(txid, origin, outcome, json.loads(ops), json.loads(result), seq, ts)

    def get(self, seq: int) -> AuditRecord | None:
        return next(self.records(since=seq - 1, limit=1), None) if seq > 0 else None

    def last_seq(self) -> int:
        row = self.db.execute("select coalesce(max(seq), 0) from audit").fetchone()
        return int(row[0])

    def close(self) -> None:
        self.db.close()
