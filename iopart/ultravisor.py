"""The ultravisor partition: owns the pool, the resource database and the audit log.

One thread, one selector loop:

* the control socket (`ultravisor.sock`), where a system partition connects,
  says its name, and gets a fresh command channel and its own memory extent over
  SCM_RIGHTS (the connection stays open so the peer sees EOF if we die); a
  connection that says `?descriptors` gets the descriptor table fd instead;
* the pidfd of each connected partition (taken from SO_PEERCRED): when it dies,
  its open transactions are rolled back (claim 5) and its channel is torn down;
* the request doorbell of each command channel: a batch is served, made durable
  with one audit commit, and answered; then the descriptor table is brought up
  to date.

The pool is the partition-memory area (offset 0, divided by the page map of the
resource database) followed by the system area (channels, command memory).
At start the database is rebuilt by replaying the audit log (claim 7).

    python -m iopart.ultravisor --state-dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import selectors
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iopart._native import lib
from iopart.auditlog import AuditLog
from iopart.channels import Channel, ChannelGeometry, Region, RegionTable, Role
from iopart.channels.handoff import offer_channel
from iopart.command_channel import CommandServer
from iopart.config import load as load_config
from iopart.cpu_enforcer import CpuEnforcer
from iopart.descriptors import DescriptorTable, regions_for
from iopart.errors import IopartError
from iopart.pool import Extent, HostMemoryPool
from iopart.resources import NAME_RE, ResourceDB
from iopart.transaction import TransactionManager, replay

log = logging.getLogger("iopart.ultravisor")

COMMAND_MEMORY = 16 << 20
COMMAND_SLOTS = 64
READ_WRITE = int(lib.IOP_ACCESS_READ | lib.IOP_ACCESS_WRITE)
AUDIT_REPLY_BUDGET = 96 << 10  # bytes of records per audit query reply
IO_CHANNEL_AREA = 16 << 20  # pool bytes the I/O partitions share for their clients' channels
FDSTORE_MAX = 1024  # fds kept for the I/O partitions (two doorbells per endpoint)


@dataclass
class Session:
    """One connected partition: its channel, memory, server and pidfd."""

    origin: str
    pid: int
    pidfd: int
    conn: socket.socket
    channel: Channel
    memory: Extent
    server: CommandServer

    def close(self, pool: HostMemoryPool) -> None:
        self.server.end.close()
        self.channel.close()
        pool.release(self.memory)
        os.close(self.pidfd)
        self.conn.close()


class Ultravisor:
    def __init__(self, state_dir: Path, memory_bytes: int = 1 << 30,
                 system_bytes: int = 64 << 20, cpu_capacity: float | None = None) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.pool = HostMemoryPool(memory_bytes + system_bytes, name="iopart-host-pool")
        self.memory_area = self.pool.allocate(memory_bytes)
        self.db = ResourceDB(cpu_capacity or float(os.cpu_count() or 1), memory_bytes)
        self.audit = AuditLog(state_dir / "audit.db")
        self.replayed = replay(self.db, self.audit)
        self.descriptors = DescriptorTable(self.pool.size)
        self.cpu = CpuEnforcer(state_dir)
        self.sync_descriptors()
        self.cpu.attach("ultravisor", os.getpid(), self.db.partitions)
        self.tm = TransactionManager(self.db, self.audit)
        self.sel = selectors.DefaultSelector()
        self.sessions: dict[int, Session] = {}
        # shared by the redundant I/O partitions and kept while we run, so channels
        # outlive the I/O partition that made them (failover)
        self.io_area: Extent | None = None
        self.fdstore: dict[str, list[int]] = {}
        self.monitors: dict[int, tuple[str, int, socket.socket]] = {}  # pidfd -> guest, pid
        self.sock_path = state_dir / "ultravisor.sock"
        self.running = True

    def sync_descriptors(self) -> int:
        regions = {
            n: regions_for(self.db.memory_of(n), self.memory_area.offset)
            for n in self.db.partitions
        }
        changed = self.descriptors.sync(self.db.partitions, regions)
        self.cpu.sync(self.db.partitions)
        return changed

    # -- messages from a command channel
    def handle(self, origin: str, msg: Any) -> dict[str, Any]:
        if isinstance(msg, dict) and "query" in msg:
            return self.query(msg)
        return self.tm.handle(origin, msg)

    def query(self, msg: dict[str, Any]) -> dict[str, Any]:
        q = msg["query"]
        if q == "snapshot":
            return {"snapshot": self.db.snapshot(), "audit_seq": self.audit.last_seq(),
                    "replayed": self.replayed}
        if q == "audit":
            since, limit = int(msg.get("since", 0)), min(int(msg.get("limit", 100)), 1000)
            recs: list[dict[str, Any]] = []
            size = 0
            for r in self.audit.records(since=since, limit=limit):
                size += len(json.dumps(r.__dict__))
                if recs and size > AUDIT_REPLY_BUDGET:
                    break
                recs.append(r.__dict__)
            return {"records": recs, "last_seq": self.audit.last_seq()}
        if q == "stats":
            pm = self.db.pagemap
            return {"committed": self.tm.committed, "refused": self.tm.refused,
                    "rolled_back": self.tm.rolled_back, "open": len(self.tm.pending),
                    "replayed": self.replayed, "pool_size": self.pool.size,
                    "pool_hugetlb": self.pool.hugetlb, "memory_bytes": pm.total_bytes,
                    "memory_free": pm.free_bytes(), "pagemap": pm.counters(),
                    "descriptor_publishes": self.descriptors.publishes,
                    "cpu": self.cpu.report(),
                    "monitors": [{"partition": m[0], "pid": m[1]}
                                 for m in self.monitors.values()],
                    "sessions": [{"origin": s.origin, "pid": s.pid,
                                  "served": s.server.served, "refused": s.server.refused}
                                 for s in self.sessions.values()],
                    "pid": os.getpid()}
        raise IopartError(f"unknown query {q!r}", errno=errno.EINVAL)

    # -- connections
    def accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        try:
            s = self._session(conn)
        except (OSError, IopartError) as exc:
            log.warning("control connection dropped: %s", exc)
            s = None
        if s is None:
            conn.close()
            return
        self.sessions[s.pidfd] = s
        self.sel.register(s.pidfd, selectors.EVENT_READ, ("peer", s))
        self.sel.register(s.channel.doorbells.req, selectors.EVENT_READ, ("kick", s))
        log.info("%s connected: command channel at pool offset %#x", s.origin,
                 s.channel.extent.offset)
        self.serve(s)

    def _session(self, conn: socket.socket) -> Session | None:
        conn.settimeout(2.0)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", creds)
        raw, fds, _flags, _addr = socket.recv_fds(conn, 256, 4)
        hello = raw.decode(errors="replace").strip()
        if hello.startswith("?fdstore "):
            self._fdstore(conn, pid, hello.split()[1:], fds)
            return None
        for fd in fds:
            os.close(fd)
        if hello == "?descriptors":
            socket.send_fds(conn, [b"descriptors"], [self.descriptors.fd])
            return None
        if hello == "?pool":
            self._give_pool(conn, pid)
            return None
        if hello.startswith("?monitor "):
            self._monitor(conn, pid, hello.split(" ", 1)[1])
            return None
        name = hello if NAME_RE.match(hello) else "unnamed"
        origin = f"{name}/{pid}"  # unique per process: a successor never inherits rollbacks
        try:
            ch = Channel(self.pool, ChannelGeometry(nslots=COMMAND_SLOTS, slot_size=128))
        except IopartError as exc:
            conn.sendall(json.dumps({"error": f"no room for a command channel: {exc}"}).encode())
            return None
        try:
            mem = self.pool.allocate(COMMAND_MEMORY)
        except IopartError as exc:
            ch.close()
            conn.sendall(json.dumps({"error": f"no room for command memory: {exc}"}).encode())
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            ch.close()
            self.pool.release(mem)
            raise
        regions = RegionTable(self.pool.size)
        regions.set([Region(0, mem.length, mem.offset, READ_WRITE)])
        end = ch.end(Role.SERVER)
        server = CommandServer(end, regions, self.pool.mm, self._handler(origin), self.flush)
        s = Session(origin, pid, pidfd, conn, ch, mem, server)
        try:
            offer_channel(conn, ch, Role.CLIENT, memory=mem)
        except OSError:
            s.close(self.pool)
            raise
        conn.settimeout(None)
        self.cpu.attach(name, pid, self.db.partitions)
        return s

    def _io_partition(self, pid: int) -> str | None:
        names = [s.origin.partition("/")[0] for s in self.sessions.values() if s.pid == pid]
        io = [n for n in names if n in self.db.partitions and self.db.partitions[n].kind == "io"]
        return io[0] if io else None

    def _give_pool(self, conn: socket.socket, pid: int) -> None:
        """The whole pool, for an I/O partition only: it serves every client's memory."""
        name = self._io_partition(pid)
        if name is None:
            log.warning("pid %d asked for the pool but is no connected I/O partition", pid)
            conn.sendall(json.dumps({"error": "only a connected I/O partition gets the pool"})
                         .encode())
            return
        if self.io_area is None:
            try:
                self.io_area = self.pool.allocate(IO_CHANNEL_AREA)
            except IopartError as exc:
                conn.sendall(json.dumps({"error": f"no room for channels: {exc}"}).encode())
                return
        area = self.io_area
        body = json.dumps({"size": self.pool.size, "partition": name,
                           "channel_area": [area.offset, area.length]}).encode()
        socket.send_fds(conn, [body], [self.pool.fd])

    def _fdstore(self, conn: socket.socket, pid: int, args: list[str], fds: list[int]) -> None:
        """Keep fds for the I/O partitions (their channels' doorbells), so that one that
        takes a channel over, or restarts, gets them: `put KEY` (fds attached), `get
        KEY`, `drop KEY`."""
        def reply(body: dict[str, Any], send: list[int] | None = None) -> None:
            socket.send_fds(conn, [json.dumps(body).encode()], send or [])

        try:
            if self._io_partition(pid) is None:
                reply({"error": "only a connected I/O partition uses the fd store"})
                return
            if len(args) != 2 or args[0] not in ("put", "get", "drop"):
                reply({"error": "say ?fdstore put|get|drop KEY"})
                return
            op, key = args
            if op == "put":
                held = sum(len(v) for v in self.fdstore.values())
                if not fds or held + len(fds) > FDSTORE_MAX:
                    reply({"error": "no fds attached, or the fd store is full"})
                    return
                for fd in self.fdstore.pop(key, []):
                    os.close(fd)
                self.fdstore[key], fds = fds, []
                reply({"ok": True, "n": len(self.fdstore[key])})
            elif op == "get":
                if key not in self.fdstore:
                    reply({"error": f"no fds stored under {key!r}"})
                    return
                reply({"ok": True, "n": len(self.fdstore[key])}, self.fdstore[key])
            else:
                for fd in self.fdstore.pop(key, []):
                    os.close(fd)
                reply({"ok": True, "n": 0})
        finally:
            for fd in fds:
                os.close(fd)

    def _monitor(self, conn: socket.socket, pid: int, name: str) -> None:
        """A guest's monitor: its memory extents (it maps them and closes the pool fd)."""
        p = self.db.partitions.get(name)
        if p is None or p.kind != "guest":
            conn.sendall(json.dumps({"error": f"no guest partition named {name!r}"}).encode())
            return
        for m in self.monitors.values():
            if m[0] == name:
                conn.sendall(json.dumps(
                    {"error": f"guest {name!r} already runs under monitor pid {m[1]}"}).encode())
                return
        regions = regions_for(self.db.memory_of(name), self.memory_area.offset)
        if not regions:
            conn.sendall(json.dumps({"error": f"guest {name!r} has no memory"}).encode())
            return
        disks = [{"device": d.name, "kind": d.kind, "server": d.server,
                  "mode": d.assigned[name]}
                 for d in self.db.devices.values() if name in d.assigned]
        body = json.dumps({"partition": name, "index": p.index, "cpu": p.cpu,
                           "regions": [r.__dict__ for r in regions], "disks": disks}).encode()
        pidfd = os.pidfd_open(pid)
        socket.send_fds(conn, [body], [self.pool.fd])
        self.cpu.attach(name, pid, self.db.partitions)
        c = conn.dup()
        self.monitors[pidfd] = (name, pid, c)
        self.sel.register(pidfd, selectors.EVENT_READ, ("monitor", None))
        log.info("monitor of %s (pid %d) took its %d region(s)", name, pid, len(regions))

    def monitor_died(self, pidfd: int) -> None:
        self.sel.unregister(pidfd)
        name, pid, conn = self.monitors.pop(pidfd)
        os.close(pidfd)
        conn.close()
        self.cpu.detach(name, pid)
        log.info("monitor of %s (pid %d) is gone", name, pid)

    def _handler(self, origin: str) -> Callable[[Any], dict[str, Any]]:
        return lambda m: self.handle(origin, m)

    def flush(self) -> list[int]:
        """Make the batch durable, then publish what it changed."""
        seqs = self.tm.flush()
        self.sync_descriptors()
        return seqs

    def peer_died(self, s: Session) -> None:
        self.sel.unregister(s.pidfd)
        self.sel.unregister(s.channel.doorbells.req)
        del self.sessions[s.pidfd]
        n = self.tm.rollback_origin(s.origin)
        self.flush()
        log.warning("%s (pid %d) is gone: %d open transaction(s) rolled back", s.origin, s.pid, n)
        self.cpu.detach(s.origin.partition("/")[0], s.pid)
        s.close(self.pool)

    def serve(self, s: Session) -> None:
        """Serve until the ring is empty and the doorbell is armed."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(s.channel.doorbells.req)
        while True:
            while s.server.serve_batch():
                pass
            # arm the event index; 0 means work arrived meanwhile
            if lib.iop_chan_wait(s.server.end.handle, -1, 0) != 0:
                return

    def run(self) -> None:
        if self.sock_path.exists():
            self.sock_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.sock_path))
        listener.listen(8)
        self.sel.register(listener, selectors.EVENT_READ, ("listen", None))
        log.info("ultravisor up: pool %d MiB (%s), %d transactions replayed",
                 self.pool.size >> 20, "hugetlb" if self.pool.hugetlb else "4 KiB pages",
                 self.replayed)
        try:
            while self.running:
                for key, _ in self.sel.select(timeout=1.0):
                    kind, s = key.data
                    if kind == "listen":
                        self.accept(listener)
                    elif kind == "monitor":
                        self.monitor_died(int(key.fd))
                    elif kind == "peer":
                        self.peer_died(s)
                    else:
                        self.serve(s)
        finally:
            for s in list(self.sessions.values()):
                s.close(self.pool)
            listener.close()
            self.sock_path.unlink(missing_ok=True)
            self.audit.close()
            self.descriptors.close()
            self.cpu.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="iopart-ultravisor")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--config", type=Path, help="host TOML config (default: built-in defaults)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ultravisor %(message)s")
    cfg = load_config(args.config).host
    uv = Ultravisor(args.state_dir, cfg.memory_mib << 20, cfg.system_mib << 20, cfg.cpus)

    def stop(*_: object) -> None:
        uv.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    uv.run()


if __name__ == "__main__":
    main()
