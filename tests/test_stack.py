"""The host stack as real processes: up/status/down, the resource service, refusals,
the descriptor table, and recovery when the ultravisor is killed."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from iopart.auditlog import AuditLog
from iopart.descriptors import DescriptorReader
from iopart.resources import ResourceDB
from iopart.rpc import INVALID_PARAMS, POLICY, REFUSED, RpcError
from iopart.transaction import replay
from iopart.uvlink import descriptor_fd
from tests.stackutil import Stack, cli, leftover_processes

pytestmark = pytest.mark.system
MIB = 1 << 20


def replayed(s: Stack) -> dict[str, object]:
    """The database rebuilt from the durable audit log, as a fresh ultravisor would."""
    st = s.status()
    db = ResourceDB(st["database"]["cpu_capacity"], st["database"]["memory_bytes"])
    log = AuditLog(s.dir / "audit.db")
    try:
        replay(db, log)
    finally:
        log.close()
    return db.snapshot()


def test_up_status_down(tmp_path: Path) -> None:
    s = Stack(tmp_path / "state")
    info = s.up()
    try:
        assert not info["already_running"]
        again = s.up()  # up is idempotent
        assert again["already_running"] and again["boot_pid"] == info["boot_pid"]
        st = s.cli_json("status")
        parts = st["database"]["partitions"]
        assert {n: (p["kind"], p["state"]) for n, p in parts.items()} == {
            "boot": ("system", "running"),
            "ultravisor": ("system", "running"),
            "command": ("system", "running"),
            "iop-a": ("io", "running"),
            "iop-b": ("io", "running"),
        }
        kids = st["boot"]["children"]
        assert kids["ultravisor"]["alive"] and kids["command"]["alive"]
        assert st["ultravisor"]["pid"] == kids["ultravisor"]["pid"]
        cpu = st["ultravisor"]["cpu"]
        assert cpu["enforced"] and not set(cpu["groups"]) & set(parts)  # system: unthrottled
        table = cli("status", *s.sd())
        assert table.returncode == 0 and "partitions" in table.stdout and "health" in table.stdout
    finally:
        s.down()
    assert not (s.dir / "boot.pid").exists()
    assert leftover_processes(s.dir) == []
    gone = cli("status", *s.sd())
    assert gone.returncode == 2 and "iopart up" in gone.stderr


def test_partition_lifecycle_through_the_cli(stack: Stack) -> None:
    made = stack.cli_json("partition", "create", "web", "--cpu", "0.25", "--memory", "12")
    p = made["partition"]
    assert (p["cpu"], p["memory"], p["state"]) == (0.25, 12 * MIB, "defined")
    assert sum(n for _, n in p["extents"]) == 12 * MIB
    shown = stack.cli_json("partition", "show", "web")
    d = shown["descriptor"]
    assert sum(r["len"] for r in d["regions"]) == 12 * MIB and d["generation"] % 2 == 0
    stack.cli_json("partition", "set-memory", "web", "20")
    grown = stack.cli_json("partition", "show", "web")
    assert grown["memory"] == 20 * MIB
    assert grown["descriptor"]["generation"] > d["generation"]
    stack.cli_json("partition", "set-cpu", "web", "0.5")
    listed = stack.cli_json("partition", "list")["partitions"]
    assert [q["cpu"] for q in listed if q["name"] == "web"] == [0.5]
    stack.cli_json("partition", "destroy", "web")
    assert "web" not in stack.status()["database"]["partitions"]
    recs = stack.cli_json("audit", "list")["records"]
    ops = [o["op"] for r in recs if r["outcome"] == "committed" for o in r["ops"]]
    assert ops.count("set_memory") == 2 and "destroy_partition" in ops
    one = stack.cli_json("audit", "show", str(recs[-1]["seq"]))
    assert one == recs[-1]
    assert replayed(stack) == stack.status()["database"]


@pytest.mark.parametrize(
    ("method", "params", "code", "field", "err"),
    [
        ("partition.create", {"name": "Bad Name"}, INVALID_PARAMS, "name", errno.EINVAL),
        ("partition.create", {"name": "x", "colour": 1}, INVALID_PARAMS, "colour", errno.EINVAL),
        ("partition.create", {"name": "x", "cpu": 3.0}, POLICY, "cpu", errno.EPERM),
        ("partition.create", {"name": "x", "memory_mib": 4096}, POLICY, "memory_mib", errno.EPERM),
        ("partition.create", {"name": "y", "cpu": 1.0}, REFUSED, "cpu", errno.ENOSPC),
        ("partition.create", {"name": "boot"}, REFUSED, "name", errno.EEXIST),
        ("partition.set_cpu", {"name": "nobody", "cpu": 0.1}, REFUSED, "name", errno.ENOENT),
        ("partition.destroy", {"name": "command"}, POLICY, "name", errno.EPERM),
        ("partition.set_memory", {"name": "x"}, INVALID_PARAMS, "memory_mib", errno.EINVAL),
        ("audit.show", {"seq": 999999}, REFUSED, "seq", errno.ENOENT),
    ],
)
def test_bad_requests_are_refused_naming_the_field_and_change_nothing(
    stack: Stack, method: str, params: dict[str, object], code: int, field: str, err: int
) -> None:
    if method == "partition.create" and params["name"] == "y":
        stack.call("partition.create", name="x", cpu=1.0, memory_mib=1)  # 2 CPUs: 1.03 used
    before = stack.status()["database"]
    seq_before = stack.call("audit.list", limit=1000)["last_seq"]
    with pytest.raises(RpcError) as ei:
        stack.call(method, **params)
    e = ei.value
    assert (e.code, e.data["field"], e.data["errno"]) == (code, field, err), e.to_dict()
    assert stack.status()["database"] == before
    if code == REFUSED and method != "audit.show" and params.get("name") not in ("boot", "nobody"):
        # refused by the ultravisor: recorded as refused in the audit log
        recs = stack.call("audit.list", since=seq_before)["records"]
        assert [r["outcome"] for r in recs] == ["refused"]


def test_garbage_on_the_service_socket_gets_errors_not_a_crash(stack: Stack) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(stack.dir / "command.sock"))
        f = sock.makefile("rb")
        for line, code in ((b"{not json\n", -32700), (b"[1,2]\n", -32600),
                           (b'{"jsonrpc":"2.0","id":1,"method":"nope"}\n', -32601)):
            sock.sendall(line)
            assert json.loads(f.readline())["error"]["code"] == code
    assert stack.call("ping")["pong"]


def test_descriptor_table_is_read_only_for_readers_and_tracks_reassignment(
    stack: Stack,
) -> None:
    stack.call("partition.create", name="g1", cpu=0.1, memory_mib=8)
    index = stack.status()["database"]["partitions"]["g1"]["index"]
    fd = descriptor_fd(stack.dir)
    with pytest.raises(PermissionError):  # sealed: no writable mapping, even for root
        mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
    reader = DescriptorReader(fd)
    try:
        d = reader.read(index)
        assert d is not None and d.name == "g1" and d.memory == 8 * MIB
        sg, gen = reader.translate(index, 4096, 8192)
        assert sum(n for _, n in sg) == 8192 and reader.valid(index, gen)
        with pytest.raises(Exception, match="EFAULT"):
            reader.translate(index, 8 * MIB - 10, 100)  # past the partition's memory
        stack.call("partition.set_memory", name="g1", memory_mib=4)
        assert not reader.valid(index, gen)  # checked before the reassignment: refused now
        d2 = reader.read(index)
        assert d2 is not None and d2.memory == 4 * MIB and d2.generation > gen
        stack.call("partition.destroy", name="g1")
        assert reader.read(index) is None
    finally:
        reader.close()


def test_bad_config_is_refused_before_anything_starts(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[policy]\nmax_partition_cpu = 1.0\nmax_cpus = 3\n")
    res = cli("up", "--state-dir", str(tmp_path / "st"), "--config", str(cfg))
    assert res.returncode == 2 and "policy.max_cpus: unknown key" in res.stderr
    assert not (tmp_path / "st" / "boot.pid").exists()
    assert leftover_processes(tmp_path / "st") == []


def test_config_definitions_are_created_at_boot(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text(
        "[host]\ncpus = 2\nmemory_mib = 256\n\n[policy]\nmax_partition_memory_mib = 64\n\n"
        '[[partition]]\nname = "web"\ncpu = 0.5\nmemory_mib = 32\n'
    )
    s = Stack(tmp_path / "state", cfg)
    s.up()
    try:
        s.wait_healthy()
        st = s.status()
        assert st["database"]["memory_bytes"] == 256 * MIB
        web = st["database"]["partitions"]["web"]
        assert (web["cpu"], web["memory"]) == (0.5, 32 * MIB)
        with pytest.raises(RpcError, match="max_partition_memory_mib 64"):
            s.call("partition.create", name="big", memory_mib=65)
    finally:
        s.down()


def test_sigkill_of_the_ultravisor_is_recovered_by_boot_with_an_equal_database(
    stack: Stack,
) -> None:
    for i in range(5):
        stack.call("partition.create", name=f"g{i}", cpu=0.1, memory_mib=3 + i)
    stack.call("partition.destroy", name="g2")
    before = stack.status()["database"]
    old = stack.pids()["ultravisor"]
    os.kill(old, signal.SIGKILL)
    stack.wait_healthy(restarts={"ultravisor": 1})
    assert stack.pids()["ultravisor"] != old
    st = stack.status()
    assert st["database"] == before  # rebuilt by replaying the audit log
    assert st["ultravisor"]["replayed"] >= 6
    # and it goes on working: the next transaction commits
    stack.call("partition.create", name="after", cpu=0.1, memory_mib=1)


def test_a_partition_dying_mid_transaction_is_rolled_back(stack: Stack) -> None:
    """Claim 5: a process opens a multi-message transaction over its own command
    channel and is SIGKILLed before committing; the database returns to before."""
    before = stack.status()["database"]
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from iopart.uvlink import UltravisorLink\n"
        "l = UltravisorLink.connect(Path(sys.argv[1]), 'intruder')\n"
        "l.call({'tx': 1, 'begin': True, 'steps': [{'op': 'create_partition', "
        "'name': 'half', 'cpu': 0.5}]})\n"
        "l.call({'tx': 1, 'steps': [{'op': 'set_memory', 'name': 'half', 'memory': 4096}]})\n"
        "print('open', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(stack.dir)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "open"
        # while it is open the database is held: others are told so, not blocked
        with pytest.raises(RpcError, match="held by open transaction") as busy:
            stack.call("partition.create", name="other", cpu=0.1)
        assert busy.value.data["errno"] == errno.EBUSY
    finally:
        child.kill()
        child.wait()
    for _ in range(200):
        recs = stack.call("audit.list", limit=1000)["records"]
        if any(r["outcome"] == "rolled_back" for r in recs):
            break
        import time

        time.sleep(0.02)
    rolled = [r for r in recs if r["outcome"] == "rolled_back"]
    assert rolled and rolled[-1]["origin"].startswith("intruder/")
    assert [o["op"] for o in rolled[-1]["ops"]] == ["create_partition", "set_memory"]
    assert stack.status()["database"] == before
    stack.call("partition.create", name="other", cpu=0.1)  # the database is free again


def test_a_partition_given_a_quarter_cpu_gets_a_quarter(stack: Stack) -> None:
    """Claims 26-28 end to end: the share is a transaction, the ultravisor applies it
    with cgroups to the process that runs as that partition."""
    stack.call("partition.create", name="spin", cpu=0.25, memory_mib=1)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from iopart.uvlink import UltravisorLink\n"
        "l = UltravisorLink.connect(Path(sys.argv[1]), 'spin')\n"
        "print('in', flush=True)\n"
        "while True: pass\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(stack.dir)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "in"

        def group() -> dict[str, Any]:
            g: dict[str, Any] = stack.status()["ultravisor"]["cpu"]["groups"]["spin"]
            return g

        import time

        for _ in range(100):
            if child.pid in group()["pids"]:
                break
            time.sleep(0.02)
        assert child.pid in group()["pids"]
        assert group()["quota_us"] == 25_000
        time.sleep(0.3)
        u0, t0 = group()["usage_ns"], time.monotonic()
        time.sleep(2.0)
        used = (group()["usage_ns"] - u0) / ((time.monotonic() - t0) * 1e9)
        assert 0.20 <= used <= 0.30, f"0.25 CPU measured as {used:.3f}"
        # a new share is a transaction and takes effect at once
        stack.call("partition.set_cpu", name="spin", cpu=0.5)
        assert group()["quota_us"] == 50_000
    finally:
        child.kill()
        child.wait()
    stack.call("partition.destroy", name="spin")
    assert "spin" not in stack.status()["ultravisor"]["cpu"]["groups"]


def test_a_session_beyond_the_system_area_is_refused_clearly(tmp_path: Path) -> None:
    from iopart.errors import HandoffError
    from iopart.uvlink import UltravisorLink

    cfg = tmp_path / "small.toml"
    # room for 4 sessions (boot, command, iop-a, iop-b) and the 16 MiB I/O area
    cfg.write_text("[host]\nsystem_mib = 88\nmemory_mib = 64\n")
    s = Stack(tmp_path / "state", cfg)
    s.up()
    try:
        s.wait_healthy()
        with pytest.raises(HandoffError, match="no room for command memory"):
            UltravisorLink.connect(s.dir, "extra", timeout=0.5)
        s.call("partition.create", name="still", cpu=0.1, memory_mib=1)  # nothing broke
    finally:
        s.down()
