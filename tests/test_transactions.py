"""Transactions against an independent model, the audit log, rollback and replay."""

from __future__ import annotations

import copy
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iopart.auditlog import AuditLog
from iopart.resources import RefusedError, ResourceDB, parse_op
from iopart.transaction import ReplayError, TransactionManager, replay

pytestmark = pytest.mark.unit

CPUS = 2.0
MEM = (20 << 20) + (3 << 12)  # not a whole number of 4 MiB blocks: the map's end is split
PAGE = 4096
NAMES = ["a", "b", "c", "iop"]
DEVS = ["d0", "d1"]


class Model:
    """The rules of the resource database, written again as plainly as possible."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, Any]] = {}
        self.devs: dict[str, dict[str, Any]] = {}
        self.chans: dict[str, tuple[str, str]] = {}

    def ok(self, o: dict[str, Any]) -> bool:
        """Apply if allowed; return whether it was."""
        p, d, k = self.parts, self.devs, o["op"]
        cpu_used = sum(v["cpu"] for v in p.values())
        mem_used = sum(v["memory"] for v in p.values())
        pages = -(-o.get("memory", 0) // PAGE) * PAGE
        if k == "create_partition":
            if o["name"] in p or cpu_used + o["cpu"] > CPUS + 1e-9 or mem_used + pages > MEM:
                return False
            p[o["name"]] = {
                "cpu": o["cpu"], "kind": o["kind"], "state": "defined", "memory": pages
            }
        elif k == "set_memory":
            n = o["name"]
            if n not in p or mem_used - p[n]["memory"] + pages > MEM:
                return False
            p[n]["memory"] = pages
        elif k == "destroy_partition":
            n = o["name"]
            if n not in p or any(n in c for c in self.chans.values()):
                return False
            if any(n in v["assigned"] or v["server"] == n for v in d.values()):
                return False
            del p[n]
        elif k == "set_cpu":
            n = o["name"]
            if n not in p or cpu_used - p[n]["cpu"] + o["cpu"] > CPUS + 1e-9:
                return False
            p[n]["cpu"] = o["cpu"]
        elif k == "set_state":
            if o["name"] not in p:
                return False
            p[o["name"]]["state"] = o["state"]
        elif k == "add_device":
            srv = p.get(o["server"])
            if o["name"] in d or srv is None or srv["kind"] != "io":
                return False
            if any(v["path"] == o["path"] for v in d.values()):
                return False
            d[o["name"]] = {"path": o["path"], "server": o["server"], "assigned": {}}
        elif k == "remove_device":
            if o["name"] not in d or d[o["name"]]["assigned"]:
                return False
            del d[o["name"]]
        elif k == "assign":
            dev = d.get(o["device"])
            if dev is None or o["partition"] not in p or o["partition"] in dev["assigned"]:
                return False
            if o["mode"] == "rw" and "rw" in dev["assigned"].values():
                return False
            dev["assigned"][o["partition"]] = o["mode"]
        elif k == "unassign":
            dev = d.get(o["device"])
            if dev is None or o["partition"] not in dev["assigned"]:
                return False
            del dev["assigned"][o["partition"]]
        elif k == "create_channel":
            if o["name"] in self.chans or o["server"] not in p or o["client"] not in p:
                return False
            if o["server"] == o["client"]:
                return False
            self.chans[o["name"]] = (o["server"], o["client"])
        elif k == "destroy_channel":
            if o["name"] not in self.chans:
                return False
            del self.chans[o["name"]]
        return True

    def view(self) -> dict[str, Any]:
        return {
            "parts": {
                n: (v["cpu"], v["kind"], v["state"], v["memory"])
                for n, v in sorted(self.parts.items())
            },
            "devs": {
                n: (v["path"], v["server"], dict(sorted(v["assigned"].items())))
                for n, v in sorted(self.devs.items())
            },
            "chans": dict(sorted(self.chans.items())),
        }


def db_view(db: ResourceDB) -> dict[str, Any]:
    held = 0
    for p in db.partitions.values():
        extents = db.memory_of(p.name)
        assert sum(e.length for e in extents) == p.memory, f"{p.name} holds other than its memory"
        assert all(db.pagemap.owner_of(e.offset) == p.index for e in extents)
        held += p.memory
    assert db.pagemap.used_bytes() == held, "pages held by no partition"
    return {
        "parts": {
            n: (p.cpu, p.kind, p.state, p.memory) for n, p in sorted(db.partitions.items())
        },
        "devs": {
            n: (d.path, d.server, dict(sorted(d.assigned.items())))
            for n, d in sorted(db.devices.items())
        },
        "chans": {n: (c.server, c.client) for n, c in sorted(db.channels.items())},
    }


def random_op(rng: random.Random) -> dict[str, Any]:
    n = rng.choice(NAMES)
    k = rng.choice(
        [
            "create_partition",
            "create_partition",
            "destroy_partition",
            "set_cpu",
            "set_memory",
            "set_memory",
            "set_state",
            "add_device",
            "remove_device",
            "assign",
            "unassign",
            "create_channel",
            "destroy_channel",
        ]
    )
    cpu = rng.choice([0.25, 0.5, 1.0, 1.5])
    mem = rng.choice([0, 1000, 4096, 9000, 1 << 20, 3 << 20, 4 << 20, 5 << 20, 9 << 20])
    if k == "create_partition":
        kind = "io" if n == "iop" else "guest"
        return {"op": k, "name": n, "kind": kind, "cpu": cpu, "memory": mem}
    if k == "set_memory":
        return {"op": k, "name": n, "memory": mem}
    if k in ("destroy_partition",):
        return {"op": k, "name": n}
    if k == "set_cpu":
        return {"op": k, "name": n, "cpu": cpu}
    if k == "set_state":
        return {"op": k, "name": n, "state": rng.choice(["running", "stopped"])}
    if k == "add_device":
        return {
            "op": k,
            "name": rng.choice(DEVS),
            "kind": "disk",
            "path": f"/dev/x{rng.randrange(3)}",
            "server": rng.choice(["iop", n]),
        }
    if k == "remove_device":
        return {"op": k, "name": rng.choice(DEVS)}
    if k in ("assign", "unassign"):
        o = {"op": k, "device": rng.choice(DEVS), "partition": n}
        if k == "assign":
            o["mode"] = rng.choice(["rw", "ro"])
        return o
    if k == "create_channel":
        return {"op": k, "name": f"ch{rng.randrange(3)}", "server": rng.choice(NAMES), "client": n}
    return {"op": k, "name": f"ch{rng.randrange(3)}"}


def run_random(seed: int, n_tx: int, path: Path) -> tuple[TransactionManager, Model]:
    rng = random.Random(seed)
    log = AuditLog(path)
    tm = TransactionManager(ResourceDB(CPUS, MEM), log)
    model = Model()
    for txid in range(1, n_tx + 1):
        before = tm.db.snapshot()
        steps = [random_op(rng) for _ in range(rng.randint(1, 4))]
        trial = copy.deepcopy(model)
        accepted = all(trial.ok(s) for s in steps)
        abort = rng.random() < 0.1
        msg: dict[str, Any] = {"tx": txid, "steps": steps, "commit": True}
        if abort:
            msg = {"tx": txid, "begin": True, "steps": steps}
        try:
            reply = tm.handle("command", msg)
            if abort:
                tm.handle("command", {"tx": txid, "abort": True})
            assert accepted, f"tx {txid} was accepted, the model refuses it: {steps}"
            if not abort:
                assert reply["state"] == "committed"
                model = trial
            if abort:
                assert tm.db.snapshot() == before, f"abort of tx {txid} left changes"
        except RefusedError:
            assert not accepted, f"tx {txid} was refused, the model accepts it: {steps}"
            assert tm.db.snapshot() == before, f"refused tx {txid} left changes"
        if txid % 50 == 0:
            tm.flush()
        assert db_view(tm.db) == model.view()
    tm.flush()
    return tm, model


@settings(
    max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1))
def test_ten_thousand_random_transactions_match_the_model(
    seed: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp_path = tmp_path_factory.mktemp("tx10k")
    tm, model = run_random(seed=seed, n_tx=10_000, path=tmp_path / "audit.db")
    assert tm.committed > 500 and tm.refused > 1000  # the mix exercised both outcomes
    assert not tm.pending and tm.holder is None
    # replaying the durable log rebuilds the very same database
    fresh = ResourceDB(CPUS, MEM)
    n = replay(fresh, AuditLog(tmp_path / "audit.db"))
    assert n == tm.committed
    assert fresh.snapshot() == tm.db.snapshot()
    assert db_view(fresh) == model.view()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_transactions_replay_identically(
    seed: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("tx") / "audit.db"
    tm, _ = run_random(seed, 150, path)
    fresh = ResourceDB(CPUS, MEM)
    replay(fresh, AuditLog(path))
    assert fresh.snapshot() == tm.db.snapshot()


def test_multi_message_transaction_rolls_back_on_origin_failure(tmp_path: Path) -> None:
    tm = TransactionManager(ResourceDB(CPUS), AuditLog(tmp_path / "a.db"))
    tm.handle(
        "command", {"tx": 1, "steps": [{"op": "create_partition", "name": "g1"}], "commit": True}
    )
    before = tm.db.snapshot()
    tm.handle(
        "command",
        {"tx": 2, "begin": True, "steps": [{"op": "create_partition", "name": "g2", "cpu": 0.5}]},
    )
    tm.handle(
        "command",
        {
            "tx": 2,
            "steps": [
                {"op": "set_cpu", "name": "g1", "cpu": 1.0},
                {"op": "set_state", "name": "g1", "state": "running"},
            ],
        },
    )
    assert tm.db.snapshot() != before
    # while it is open, every other transaction is refused with EBUSY
    with pytest.raises(RefusedError, match="held by open transaction 2") as busy:
        tm.handle(
            "boot", {"tx": 9, "steps": [{"op": "create_partition", "name": "x"}], "commit": True}
        )
    assert busy.value.errno == 16
    assert tm.rollback_origin("command") == 1
    assert tm.db.snapshot() == before
    # the rolled-back transaction cannot be continued or committed afterwards
    with pytest.raises(RefusedError, match="no open transaction 2"):
        tm.handle("command", {"tx": 2, "commit": True})
    tm.flush()
    outcomes = [r.outcome for r in tm.log.records()]
    assert outcomes == ["committed", "refused", "rolled_back", "refused"]


def test_refused_step_names_the_field_and_changes_nothing(tmp_path: Path) -> None:
    tm = TransactionManager(ResourceDB(CPUS), AuditLog(tmp_path / "a.db"))
    tm.handle(
        "command",
        {"tx": 1, "steps": [{"op": "create_partition", "name": "g1", "cpu": 1.5}], "commit": True},
    )
    before = tm.db.snapshot()
    cases = [
        ({"op": "create_partition", "name": "g2", "cpu": 1.0}, "cpu", "exceeds the host"),
        ({"op": "create_partition", "name": "Bad Name"}, "name", "must be 1-63"),
        ({"op": "create_partition", "name": "g3", "colour": "red"}, "colour", "unknown field"),
        ({"op": "set_cpu", "name": "nope", "cpu": 0.1}, "name", "no partition named 'nope'"),
        ({"op": "set_cpu", "name": "g1", "cpu": -1}, "cpu", "positive number"),
        ({"op": "assign", "device": "d9", "partition": "g1"}, "device", "no device"),
        ({"op": "explode"}, "op", "unknown operation"),
        ({"op": "create_channel", "name": "c", "server": "g1"}, "client", "missing field"),
    ]
    for i, (step, fld, text) in enumerate(cases, start=2):
        with pytest.raises(RefusedError, match=text) as exc:
            tm.handle(
                "command",
                {
                    "tx": i,
                    "steps": [{"op": "set_state", "name": "g1", "state": "running"}, step],
                    "commit": True,
                },
            )
        assert exc.value.field == fld
        assert tm.db.snapshot() == before  # the first, valid step was undone too
    assert tm.holder is None and not tm.pending


def test_failed_durable_write_undoes_the_group(tmp_path: Path) -> None:
    tm = TransactionManager(ResourceDB(CPUS), AuditLog(tmp_path / "a.db"))
    before = tm.db.snapshot()
    for i in range(3):
        tm.handle(
            "command",
            {
                "tx": i,
                "steps": [{"op": "create_partition", "name": f"p{i}", "cpu": 0.1}],
                "commit": True,
            },
        )
    tm.log.db.close()  # the log cannot be written: nothing may be acknowledged
    with pytest.raises(sqlite3.ProgrammingError):
        tm.flush()
    assert tm.db.snapshot() == before
    assert tm.committed == 0


def test_replay_detects_a_log_that_does_not_apply(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    from iopart.auditlog import AuditRecord

    log.append(
        [
            AuditRecord(
                1, "command", "committed", [{"op": "set_cpu", "name": "ghost", "cpu": 1.0}], {}
            )
        ]
    )
    with pytest.raises(ReplayError, match="record 1 does not replay"):
        replay(ResourceDB(CPUS), log)


def test_parse_op_round_trips_every_operation() -> None:
    samples = [
        {
            "op": "create_partition",
            "name": "g",
            "kind": "guest",
            "cpu": 0.5,
            "memory": 4096,
            "index": 0,
        },
        {"op": "add_device", "name": "d", "kind": "nic", "path": "tap0", "server": "iop",
         "size": 0},
        {"op": "assign", "device": "d", "partition": "g", "mode": "ro", "offset": 0,
         "length": 4096},
        {
            "op": "create_channel",
            "name": "c",
            "server": "iop",
            "client": "g",
            "nslots": 64,
            "slot_size": 128,
        },
    ]
    for s in samples:
        assert parse_op(s).to_dict() == s
