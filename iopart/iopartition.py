"""An I/O partition: physical disks and NICs multiplexed to guests' endpoints.

There are two, `iop-a` and `iop-b`; one is active and serves every endpoint, the
other is the standby (claim 24). Each connects to the ultravisor like every
system partition, then asks for the host memory pool, which only a connected I/O
partition gets: it reads and writes client buffers there, and it formats client
channels in the I/O area, which both share (`iopart.ioarea`). It maps the
descriptor table read-only and hands each endpoint's native server the client's
live region table, so every fragment is checked against the memory the client
owns at that moment (claim 20).

A guest's monitor connects to `<name>.sock` (SOCK_SEQPACKET) and asks to attach a
disk or NIC. The request is honoured only by the active I/O partition (a standby
names the active one), only if that pid is the registered monitor of the
partition and the resource database assigns the device to it; a disk endpoint
then addresses exactly the assigned byte range (claim 18). One native thread
serves all disk endpoints and one switches all NIC ports (claim 19). When the
monitor exits (its pidfd), the endpoint goes away.

Failover: the standby keeps every endpoint's doorbells ready and watches the
active's pidfd and heartbeat. When the active exits, or stays silent past the
heartbeat deadline (it is then fenced with SIGKILL), the standby serves every
endpoint: each channel's journal is replayed in order, then new requests run.
Boot restarts the failed one, which comes back as the standby.

Counters go to `<name>.json` every second and to a Prometheus endpoint.

    python -m iopart.iopartition --state-dir DIR --name iop-a [--config FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import selectors
import signal
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from iopart.channels import Channel, ChannelGeometry, Role
from iopart.channels.channel import ChannelEnd, Doorbells
from iopart.channels.handoff import offer_channel
from iopart.channels.journal import Heartbeat, Journal, monotonic_ns
from iopart.config import load as load_config
from iopart.descriptors import DescriptorReader
from iopart.drivers.blockserver import (
    BlockServer,
    EndpointStats,
    Engine,
    Extent,
    ServerConfig,
    hist_bounds_ns,
)
from iopart.drivers.disk import Disk, DiskError, create_image
from iopart.drivers.nic import Uplink, VethUplink, open_uplink
from iopart.drivers.vswitch import PortStats, SwitchConfig, VSwitch, format_mac, guest_mac
from iopart.errors import IopartError
from iopart.failover import PeerWatch
from iopart.ioarea import (
    DISK,
    FLAG_DIRECT,
    FLAG_RO,
    IO_PARTITIONS,
    NIC,
    ROLE_ACTIVE,
    ROLE_NONE,
    ROLE_STANDBY,
    ROLES,
    IoArea,
    Record,
)
from iopart.pool import Extent as PoolExtent
from iopart.pool import trim_view
from iopart.statefile import write_json_atomic
from iopart.uvlink import UltravisorError, UltravisorLink, descriptor_fd, fdstore, request_fd

log = logging.getLogger("iopart.iopartition")
DISK_CHANNEL_SLOTS = 128
DISK_CHANNEL_TYPE = uuid.UUID("6f2c1d0e-4b7a-4e51-9a0c-10a0c0de0010")
DEFAULT_DISK = "disk0"
DEFAULT_NIC = "nic0"
DEFAULT_UPLINK_ADDRESS = "10.78.0.1/24"  # the far end of the default veth, in its own netns
NIC_CHANNEL_SLOTS = 256
NIC_CHANNEL_TYPE = uuid.UUID("6f2c1d0e-4b7a-4e51-9a0c-10a0c0de0020")
_MSG = 4096


class AttachError(IopartError):
    kind = "attach"


class NotActiveError(AttachError):
    """A standby was asked to attach: the monitor asks the active one instead."""


@dataclass
class Endpoint:
    """One guest's endpoint this I/O partition serves: its record, channel, journal."""

    ep: int                 # block server endpoint or switch port
    rec: Record
    end: ChannelEnd
    bells: Doorbells
    journal: Journal
    mon_pidfd: int
    conn: socket.socket | None = None  # the monitor's attach connection, if it was ours
    replayed: int = 0

    @property
    def kind(self) -> str:
        return self.rec.kind

    @property
    def partition(self) -> str:
        return self.rec.partition

    @property
    def device(self) -> str:
        return self.rec.device

    def describe(self, stats: EndpointStats) -> dict[str, Any]:
        r = self.rec
        return {"endpoint": self.ep, "record": r.index, "partition": r.partition,
                "device": r.device, "offset": r.base, "size": r.size, "mode": r.mode,
                "direct": r.direct, "monitor_pid": r.monitor_pid,
                "journal": self.journal.state().to_dict(), "stats": stats.to_dict()}

    def describe_nic(self, stats: PortStats) -> dict[str, Any]:
        r = self.rec
        return {"port": self.ep, "record": r.index, "partition": r.partition,
                "device": r.device, "mac": format_mac(r.mac), "monitor_pid": r.monitor_pid,
                "journal": self.journal.state().to_dict(), "stats": stats.to_dict()}


@dataclass
class Prepared:
    """A standby's readiness for one record: its doorbells, fetched ahead of a takeover."""

    rec: Record
    bells: Doorbells


class IoPartition:
    def __init__(self, state_dir: Path, name: str, engine: Engine, disk_bytes: int,
                 metrics_port: int, spin_ns: int, heartbeat_ms: int = 25) -> None:
        if name not in IO_PARTITIONS:
            raise IopartError(f"an I/O partition is one of {', '.join(IO_PARTITIONS)}, "
                              f"not {name!r}", errno=errno.EINVAL)
        self.state_dir = state_dir
        self.name = name
        self.slot = IO_PARTITIONS.index(name)
        self.peer_slot = 1 - self.slot
        self.disk_bytes = disk_bytes
        self.heartbeat_ns = heartbeat_ms * 1_000_000
        self.link = UltravisorLink.connect(state_dir, name)
        self._ensure_record()
        self.pool_fd, info = request_fd(state_dir, "?pool")
        try:
            self.pool = mmap.mmap(self.pool_fd, int(info["size"]), mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.pool_fd)
            raise
        off, length = info["channel_area"]
        self.area = IoArea(self.pool, self.pool_fd, PoolExtent(int(off), int(length)),
                           state_dir / "io-area.lock")
        self.peer = PeerWatch(self.area, self.peer_slot, IO_PARTITIONS[self.peer_slot],
                              self.heartbeat_ns)
        self.dtab = DescriptorReader(descriptor_fd(state_dir))
        self.server = BlockServer(self.pool, ServerConfig(engine=engine, spin_ns=spin_ns))
        self.switch = VSwitch(self.pool, SwitchConfig(spin_ns=spin_ns))
        self.uplinks: dict[str, tuple[Uplink, int]] = {}  # device -> uplink, switch port
        self.failed_nics: set[str] = set()
        self.disks: dict[str, Disk] = {}
        self.endpoints: dict[int, Endpoint] = {}  # by record index
        self.prepared: dict[int, Prepared] = {}   # standby: by record index
        self.role = ROLE_NONE
        self.takeovers: list[dict[str, Any]] = []
        self.refused_attaches = 0
        self.sel = selectors.DefaultSelector()
        self.sock_path = state_dir / f"{name}.sock"
        self.running = True
        self.metrics_url = ""
        self._metrics_port = metrics_port + self.slot if metrics_port else 0
        self._heartbeat: Heartbeat | None = None
        self._peer_fd = -1
        self._detach_soon: list[Endpoint] = []  # endpoints whose monitor was already gone

    # -- set-up
    def _ensure_record(self) -> None:
        """Boot records us too; whoever is first creates the record, the other sees it."""
        for _ in range(100):
            parts = self.link.query("snapshot")["snapshot"]["partitions"]
            if self.name in parts:
                return
            try:
                self.link.transact([{"op": "create_partition", "name": self.name,
                                     "kind": "io", "cpu": 0.01}])
                return
            except UltravisorError as exc:
                if exc.errno not in (errno.EEXIST, errno.EBUSY):
                    raise
                time.sleep(0.05)
        raise IopartError(f"could not record I/O partition {self.name}", errno=errno.EBUSY)

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = self.link.query("snapshot")["snapshot"]
        return snap

    def ensure_default_disk(self) -> None:
        """With no disk in the database, create an image in the state directory (under the
        area lock: the two I/O partitions start together)."""
        with self.area.lock(stuck=self.fence_if_hung):
            devices = self.snapshot()["devices"]
            if any(d["kind"] == "disk" for d in devices.values()):
                return
            path = self.state_dir / "disks" / f"{DEFAULT_DISK}.img"
            if not path.exists():
                create_image(path, self.disk_bytes)
            size = os.stat(path).st_size
            try:
                self.link.transact([{"op": "add_device", "name": DEFAULT_DISK, "kind": "disk",
                                     "path": str(path), "server": IO_PARTITIONS[0],
                                     "size": size}])
                log.info("default disk %s: %s (%d MiB)", DEFAULT_DISK, path, size >> 20)
            except UltravisorError as exc:
                if exc.errno != errno.EEXIST:
                    raise

    def ensure_nics(self) -> None:
        """Open the uplinks of the NICs; with none in the database, make the default one:
        a veth pair whose far end sits in a namespace of its own."""
        devices = self.snapshot()["devices"]
        nics = {n: d for n, d in devices.items() if d["kind"] == "nic"}
        if not nics:
            nics = {DEFAULT_NIC: {"path": "veth"}}
            try:
                self.link.transact([{"op": "add_device", "name": DEFAULT_NIC, "kind": "nic",
                                     "path": "veth", "server": IO_PARTITIONS[0]}])
            except UltravisorError as exc:
                if exc.errno != errno.EEXIST:
                    raise
        self.sync_nics(nics)

    def sync_nics(self, nics: dict[str, Any] | None = None) -> None:
        """Open the uplinks of NICs added since, close those of NICs removed."""
        if nics is None:
            nics = {n: d for n, d in self.snapshot()["devices"].items() if d["kind"] == "nic"}
        for name in sorted(set(self.uplinks) - set(nics)):
            up, port = self.uplinks.pop(name)
            self.switch.remove(port)
            up.close()
            with contextlib.suppress(IopartError):
                fdstore(self.state_dir, "drop", f"uplink.{name}")
            log.info("NIC %s removed", name)
        for name, d in sorted(nics.items()):
            if name in self.uplinks or name in self.failed_nics:
                continue
            try:
                self.open_uplink(name, d["path"])
            except (IopartError, OSError) as exc:
                self.failed_nics.add(name)
                log.error("NIC %s (%s) not available: %s", name, d["path"], exc)

    def open_uplink(self, name: str, path: str) -> None:
        """The uplink's socket or TAP lives in the ultravisor's fd store: a standby taking
        over adopts it (same device, same MAC), a TAP survives us, and our exit does not
        wait for an AF_PACKET socket's release (an RCU grace period, 7 ms and more)."""
        tag = hashlib.sha1(f"{self.state_dir.resolve()}/{name}".encode()).hexdigest()[:6]
        key = f"uplink.{name}"
        try:
            (fd,) = fdstore(self.state_dir, "get", key)
        except (IopartError, ValueError):
            fd = None
        up = open_uplink(path, tag, fd)
        if fd is None:
            try:
                fdstore(self.state_dir, "put", key, [up.fileno()])
            except IopartError:
                up.close()
                raise
        port = self.switch.add_uplink(up.fileno())
        self.uplinks[name] = (up, port)
        log.info("NIC %s: %s, switch port %d", name, up.describe(), port)

    def disk(self, name: str, path: str) -> Disk:
        d = self.disks.get(name)
        if d is None or d.path != path:
            d = Disk(path)
            self.disks[name] = d
        return d

    # -- roles
    def fence_if_hung(self) -> bool:
        """Fence the other I/O partition if it is there but silent past the deadline (it
        may hold the area lock, and must never wake up to serve). False if it would not
        die."""
        v = self.peer.verdict()
        if v.alive or v.why != "heartbeat":
            return True
        log.warning("%s missed its heartbeat for %.1f ms: fencing it",
                    IO_PARTITIONS[self.peer_slot], v.silent_ms)
        if self.peer.fence():
            return True
        log.error("%s did not exit after SIGKILL", IO_PARTITIONS[self.peer_slot])
        return False

    def decide_role(self) -> None:
        """Active unless the other I/O partition is alive: then standby. When the stack
        comes up, the first of IO_PARTITIONS is given a moment to be the active one."""
        deadline = time.monotonic() + FIRST_BOOT_WAIT_S
        while (self.slot != 0 and int(self.area.header.active) < 0
               and time.monotonic() < deadline):
            time.sleep(0.01)
        with self.area.lock(stuck=self.fence_if_hung):
            me = self.area.server(self.slot)
            me.name = self.name.encode()
            me.pid = os.getpid()
            me.started_ns = monotonic_ns()
            me.role = ROLE_NONE
            peer_alive = self.peer.verdict().alive
        if peer_alive:
            self.become_standby()
        else:
            self.take_over("no other I/O partition is running")

    def become_standby(self) -> None:
        self.role = ROLE_STANDBY
        self.area.server(self.slot).role = ROLE_STANDBY
        self.prepare()
        log.info("%s is the standby: %d endpoints ready to take over", self.name,
                 len(self.prepared))
        self.write_report()

    def prepare(self) -> None:
        """Standby: fetch the doorbells of every live record ahead of a takeover."""
        live = {r.index: r for r in self.area.live()}
        for i in [i for i, p in self.prepared.items()
                  if i not in live or live[i].generation != p.rec.generation]:
            self.prepared.pop(i).bells.close()
        for i, rec in live.items():
            if i in self.prepared:
                continue
            try:
                req, rsp = fdstore(self.state_dir, "get", rec.key)
            except (IopartError, ValueError) as exc:
                log.warning("no doorbells for record %d yet: %s", i, exc)
                continue
            self.prepared[i] = Prepared(rec, Doorbells(req, rsp))

    def watch(self) -> None:
        """Standby: take over when the active exited, hangs, or there is none."""
        active = int(self.area.header.active)
        if active == self.peer_slot:
            v = self.peer.verdict()
            if v.alive:
                return
            if v.why == "heartbeat":
                t0 = monotonic_ns()
                if not self.fence_if_hung():
                    return  # not taking over what it might still touch
                self.take_over(f"heartbeat missed for {v.silent_ms:.1f} ms "
                               f"(fenced in {(monotonic_ns() - t0) / 1e6:.1f} ms)")
            else:
                self.take_over(f"{IO_PARTITIONS[self.peer_slot]} exited")
        else:
            self.take_over("no active I/O partition")

    def take_over(self, why: str) -> None:
        """Serve every live record: journals replayed, then new requests; open uplinks."""
        t0 = monotonic_ns()
        replayed = 0
        if not self.fence_if_hung():
            return
        with self.area.lock(stuck=self.fence_if_hung):
            hdr = self.area.header
            if int(hdr.active) == self.peer_slot and self.peer.verdict().alive:
                # decided under the lock: the other one took over first (it found our
                # predecessor dead too) or it recovered; two servers never share a ring
                log.info("%s: not taking over (%s): %s is active and alive", self.name, why,
                         IO_PARTITIONS[self.peer_slot])
                return
            hdr.active = self.slot
            hdr.failovers += 1 if self.role == ROLE_STANDBY else 0
            me = self.area.server(self.slot)
            me.role = ROLE_ACTIVE
            was_standby = self.role == ROLE_STANDBY
            self.role = ROLE_ACTIVE
            live = self.area.live()
            # every NIC port is back before any is switched: a frame replayed from one
            # port's journal must find its destination port
            held = any(r.kind == "nic" for r in live)
            if held:
                self.switch.hold(True)
            for rec in live:
                if rec.index in self.endpoints:
                    continue
                prep = self.prepared.pop(rec.index, None)
                if prep is not None and prep.rec.generation != rec.generation:
                    prep.bells.close()
                    prep = None
                try:
                    e = self.serve(rec, prep.bells if prep else None)
                    replayed += e.replayed
                except (IopartError, OSError) as exc:
                    log.error("cannot take over record %d (%s %s): %s", rec.index,
                              rec.partition, rec.device, exc)
                    self.unusable(rec, prep.bells if prep else None)
            if held:
                self.switch.hold(False)
            me.takeovers += 1 if was_standby else 0
            me.last_takeover_ns = monotonic_ns()
        for p in self.prepared.values():
            p.bells.close()
        self.prepared.clear()
        ms = (monotonic_ns() - t0) / 1e6
        if was_standby:
            self.takeovers.append({"why": why, "at": time.time(), "t_ns": t0, "ms": round(ms, 3),
                                   "endpoints": len(self.endpoints), "replayed": replayed})
        log.warning("%s is active (%s): %d endpoints in %.2f ms, %d requests replayed",
                    self.name, why, len(self.endpoints), ms, replayed)
        self.write_report()  # who is active is known at once, not within a second
        self.area.free_abandoned()
        with contextlib.suppress(IopartError, OSError):
            self.ensure_nics()

    # -- endpoints
    def unusable(self, rec: Record, bells: Doorbells | None) -> None:
        """A record that cannot be served (its guest scribbled on its channel): nobody
        serves it, and it is freed only once its monitor is gone, since until then the
        guest still maps those pages."""
        if bells is not None:
            bells.close()
        try:
            pidfd = os.pidfd_open(rec.monitor_pid)
        except OSError:
            self.free_record(rec)
            return
        self.sel.register(pidfd, selectors.EVENT_READ, ("unusable", rec))

    def free_record(self, rec: Record) -> None:
        if self.area.free(rec):
            with contextlib.suppress(IopartError):
                fdstore(self.state_dir, "drop", rec.key)

    def serve(self, rec: Record, bells: Doorbells | None, conn: socket.socket | None = None
              ) -> Endpoint:
        """Start serving a live (or just claimed) record: attach the server end, open the
        journal (what the previous server left runs first), add it to the data path."""
        if bells is None:
            req, rsp = fdstore(self.state_dir, "get", rec.key)
            bells = Doorbells(req, rsp)
        try:
            mon_pidfd = os.pidfd_open(rec.monitor_pid)
        except OSError:
            mon_pidfd = -1
        end = ChannelEnd(self.pool, rec.chan_off, rec.chan_len, Role.SERVER, bells)
        jr = self.area.journal(rec)
        try:
            replays = jr.open(end, self.slot)
            xlate = self.dtab.xlate_table(rec.part_index)
            if rec.kind == "nic":
                ep = self.switch.add_guest(end, xlate, rec.mac, journal=jr.handle)
            else:
                ep = self.server.add(end, xlate, self.disk(rec.device, rec.path),
                                     Extent(rec.base, rec.size), read_only=rec.read_only,
                                     direct=rec.direct, journal=jr.handle)
        except Exception:
            jr.close()
            end.close()
            if mon_pidfd >= 0:
                os.close(mon_pidfd)
            raise
        e = Endpoint(ep, rec, end, bells, jr, mon_pidfd, conn, replays)
        self.endpoints[rec.index] = e
        if mon_pidfd >= 0:
            self.sel.register(mon_pidfd, selectors.EVENT_READ, ("monitor", e))
        else:
            self._detach_soon.append(e)
        if conn is not None:
            self.sel.register(conn, selectors.EVENT_READ, ("client", e))
        return e

    def attach(self, conn: socket.socket, req: dict[str, Any]) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        part, dev = req.get("partition"), req.get("device")
        if not isinstance(part, str) or not isinstance(dev, str):
            raise AttachError("attach needs partition and device names", errno=errno.EINVAL)
        if self.role != ROLE_ACTIVE:
            raise NotActiveError(f"{self.name} is the standby; "
                                 f"{IO_PARTITIONS[self.peer_slot]} serves attaches",
                                 errno=errno.EAGAIN)
        monitors = self.link.query("stats").get("monitors", [])
        if {"partition": part, "pid": pid} not in monitors:
            raise AttachError(f"pid {pid} is not the monitor of partition {part!r}",
                              errno=errno.EPERM)
        snap = self.snapshot()
        d = snap["devices"].get(dev)
        if d is None:
            raise AttachError(f"no device named {dev!r}", errno=errno.ENOENT)
        if d["server"] not in IO_PARTITIONS:
            raise AttachError(f"{dev!r} is served by {d['server']}, not by the I/O partitions",
                              errno=errno.EXDEV)
        mode = d["assigned"].get(part)
        if mode is None:
            raise AttachError(f"{dev!r} is not assigned to {part!r}", errno=errno.EACCES)
        index = snap["partitions"][part]["index"]
        if d["kind"] == "nic":
            geo = ChannelGeometry(nslots=NIC_CHANNEL_SLOTS, slot_size=128)
            rec = self.area.claim(kind=NIC, partition=part, device=dev, part_index=index,
                                  monitor_pid=pid, base=0, size=0, flags=0, mode=mode,
                                  mac=guest_mac(index), geometry=geo)
            type_uuid = NIC_CHANNEL_TYPE
        else:
            disk = self.disk(dev, d["path"])
            off, length = d["extents"].get(part, [0, 0])
            direct = bool(req.get("direct", False))
            geo = ChannelGeometry(nslots=DISK_CHANNEL_SLOTS, slot_size=128)
            flags = (FLAG_RO if mode == "ro" else 0) | (FLAG_DIRECT if direct else 0)
            rec = self.area.claim(kind=DISK, partition=part, device=dev, part_index=index,
                                  monitor_pid=pid, base=int(off),
                                  size=int(length) or disk.size - int(off), flags=flags,
                                  mode=mode, mac=b"", geometry=geo, path=d["path"])
            type_uuid = DISK_CHANNEL_TYPE
        e: Endpoint | None = None
        try:
            ch = Channel(self.area.channel_memory(rec), geo, type_uuid=type_uuid)
            fdstore(self.state_dir, "put", rec.key, [ch.doorbells.req, ch.doorbells.rsp])
            e = self.serve(rec, ch.doorbells, conn)
            self.area.publish(rec)
            if rec.kind == "nic":
                reply = {"ok": True, "kind": "nic", "port": e.ep, "mac": format_mac(rec.mac),
                         "mtu": 1500, "mode": mode, "server": self.name,
                         "record": rec.index}
            else:
                reply = {"ok": True, "endpoint": e.ep, "size": rec.size, "mode": mode,
                         "direct": rec.direct, "server": self.name, "record": rec.index}
            conn.send(json.dumps(reply).encode())
            offer_channel(conn, ch, Role.CLIENT)
        except Exception:
            if e is not None:
                self.detach(e, keep_conn=True)
            else:
                self.area.free(rec)
            raise
        log.info("%s attached %s (record %d) as %s %d", part, dev, rec.index, rec.kind, e.ep)

    def on_connect(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            req = json.loads(conn.recv(_MSG) or b"{}")
            if not isinstance(req, dict):
                raise AttachError("an attach request is a JSON object", errno=errno.EINVAL)
            self.attach(conn, req)
        except (ValueError, IopartError, OSError) as exc:
            err = exc.to_dict() if isinstance(exc, IopartError) else {"message": str(exc)}
            body: dict[str, Any] = {"ok": False, "error": err}
            if isinstance(exc, NotActiveError):
                body["active"] = IO_PARTITIONS[self.peer_slot]
            else:
                self.refused_attaches += 1
                log.warning("attach refused: %s", err.get("message"))
            with contextlib.suppress(OSError):
                conn.send(json.dumps(body).encode())
            conn.close()
            return
        conn.settimeout(None)

    def detach(self, e: Endpoint, keep_conn: bool = False) -> None:
        """The monitor is gone (or closed its connection): the endpoint and its record go."""
        if e.mon_pidfd >= 0:
            self.sel.unregister(e.mon_pidfd)
            os.close(e.mon_pidfd)
        if e.conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(e.conn)
            if not keep_conn:
                e.conn.close()
        self.endpoints.pop(e.rec.index, None)
        if e.kind == "nic":
            ps = self.switch.remove(e.ep)
            what = f"{ps.tx_frames} frames sent, {ps.rx_frames} received, {ps.rx_dropped} " \
                   f"dropped, {ps.spoofed + ps.refused + ps.runts + ps.oversize} refused"
        else:
            st = self.server.remove(e.ep)
            what = f"{st.reads} reads, {st.writes} writes, {st.refused} refused"
        e.journal.close()
        e.end.close()
        e.bells.close()
        self.free_record(e.rec)
        log.info("%s detached %s: %s", e.partition, e.device, what)

    # -- counters
    def report(self) -> dict[str, Any]:
        eps = [e.describe(self.server.stats(e.ep)) for e in self.endpoints.values()
               if e.kind == "disk"]
        nics = [e.describe_nic(self.switch.stats(e.ep)) for e in self.endpoints.values()
                if e.kind == "nic"]
        uplinks = {n: {**u.describe(), "port": p, "stats": self.switch.stats(p).to_dict()}
                   for n, (u, p) in self.uplinks.items()}
        standby_for = [{"record": p.rec.index, "partition": p.rec.partition,
                        "device": p.rec.device, "kind": p.rec.kind}
                       for p in self.prepared.values()]
        return {"name": self.name, "pid": os.getpid(), "role": ROLES[self.role],
                "engine": self.server.config.engine.name,
                "heartbeat_ms": self.heartbeat_ns / 1e6,
                "metrics_url": self.metrics_url, "updated": time.time(),
                "disks": {n: d.info().to_dict() for n, d in self.disks.items()},
                "endpoints": sorted(eps, key=lambda x: x["endpoint"]),
                "nic_ports": sorted(nics, key=lambda x: x["port"]), "uplinks": uplinks,
                "standby_for": standby_for, "takeovers": self.takeovers[-20:],
                "failovers": int(self.area.header.failovers),
                "switch": self.switch.switch_stats(),
                "refused_attaches": self.refused_attaches,
                "server": self.server.server_stats()}

    def write_report(self) -> None:
        write_json_atomic(self.state_dir / f"{self.name}.json", self.report(), durable=False)

    def start_metrics(self) -> None:
        registry = CollectorRegistry()
        registry.register(EndpointCollector(self))
        srv, _thread = start_http_server(self._metrics_port, addr="127.0.0.1", registry=registry)
        self.metrics_url = f"http://127.0.0.1:{srv.server_port}/metrics"

    # -- main loop
    def run(self) -> None:
        self.ensure_default_disk()
        self._heartbeat = Heartbeat(self.area.heartbeat_word(self.slot),
                                    max(self.heartbeat_ns // 5, 1_000_000))
        self.start_metrics()
        self.decide_role()
        # the report exists before the socket does: `iopart up` waits for the socket
        stats_path = self.state_dir / f"{self.name}.json"
        self.write_report()
        self.sock_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(str(self.sock_path))
        listener.listen(64)
        self.sel.register(listener, selectors.EVENT_READ, ("listen", None))
        self.sel.register(self.link.fileno(), selectors.EVENT_READ, ("ultravisor", None))
        raise_control_priority()
        log.info("%s up (%s): engine %s, heartbeat deadline %d ms, metrics %s", self.name,
                 ROLES[self.role], self.server.config.engine.name, self.heartbeat_ns // 10**6,
                 self.metrics_url)
        next_report = next_prepare = 0.0
        tick = 0.05  # a standby looks at least this often (and at every deadline)
        try:
            while self.running:
                self._watch_peer_fd()
                wait = self.peer.next_check_s(tick) if self.role == ROLE_STANDBY else 0.5
                for key, _ in self.sel.select(timeout=wait):
                    kind, e = key.data
                    if kind == "listen":
                        self.on_connect(listener)
                    elif kind in ("client", "monitor"):
                        if e.rec.index in self.endpoints:
                            self.detach(e)
                    elif kind == "peer":
                        pass  # looked at below
                    elif kind == "unusable":
                        self.sel.unregister(key.fd)
                        os.close(key.fd)
                        self.free_record(e)
                        log.info("record %d of %s freed: its monitor is gone", e.index,
                                 e.partition)
                    elif not self.link.alive():
                        # a new ultravisor has a new pool: start again (boot restarts us)
                        log.warning("the ultravisor is gone: stopping")
                        self.running = False
                for e in self._detach_soon:
                    if e.rec.index in self.endpoints:
                        self.detach(e)
                self._detach_soon.clear()
                now = time.monotonic()
                if self.role == ROLE_STANDBY:
                    self.watch()
                    if self.role == ROLE_STANDBY and now >= next_prepare:
                        self.prepare()
                        next_prepare = now + 0.05
                if now >= next_report:
                    trimmed = trim_view(self.pool, TRIM_ABOVE)
                    if trimmed:
                        log.info("pool view trimmed: %d MiB were mapped", trimmed >> 20)
                    if self.role == ROLE_ACTIVE:
                        with contextlib.suppress(IopartError):
                            self.sync_nics()
                        self.area.free_abandoned()
                        # a hung standby is no standby: fenced, boot restarts it
                        self.fence_if_hung()
                    self.write_report()
                    next_report = now + 1.0
        finally:
            self.shutdown(listener, stats_path)

    def _watch_peer_fd(self) -> None:
        """Keep the other I/O partition's pidfd in the selector: its exit wakes us."""
        fd = self.peer.fileno()
        if fd == self._peer_fd:
            return
        if self._peer_fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self._peer_fd)
        self._peer_fd = fd
        if fd >= 0:
            self.sel.register(fd, selectors.EVENT_READ, ("peer", None))

    def shutdown(self, listener: socket.socket, stats_path: Path) -> None:
        """Stop serving without freeing records: the guests live on, and the other I/O
        partition takes their channels over."""
        self.area.server(self.slot).role = ROLE_NONE
        listener.close()
        self.sock_path.unlink(missing_ok=True)
        stats_path.unlink(missing_ok=True)
        self.server.stop()
        self.switch.stop()
        peer_alive = self.peer.verdict().alive
        for e in list(self.endpoints.values()):
            e.journal.close()
            e.end.close()
            e.bells.close()
            if e.mon_pidfd >= 0:
                os.close(e.mon_pidfd)
        self.endpoints.clear()
        for p in self.prepared.values():
            p.bells.close()
        for up, _port in self.uplinks.values():
            if isinstance(up, VethUplink) and peer_alive:
                up.sock.close()  # the other I/O partition keeps using the pair
            else:
                up.close()
        for d in self.disks.values():
            d.close()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.peer.close()
        self.link.close()


FIRST_BOOT_WAIT_S = 3.0  # at the stack's first start, iop-b lets iop-a be the active one
TRIM_ABOVE = 64 << 20  # pool bytes mapped before the view is trimmed (exit cost ~3 ms)

# The main thread, which watches the other I/O partition and takes over, runs above
# guests once the partition serves or stands by: a takeover is not kept waiting. The
# data-path threads keep the default (busy, they would starve a restarting partition
# on a small host) and the heartbeat thread is real-time.
CONTROL_NICE = -10


def raise_control_priority() -> None:
    """This thread only (Linux nice values are per thread)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, CONTROL_NICE)


class EndpointCollector(Collector):
    """Prometheus view of the native counters, read when scraped."""

    def __init__(self, iop: IoPartition) -> None:
        self.iop = iop

    def collect(self) -> Iterator[Any]:
        labels = ["io_partition", "partition", "device"]
        ops = CounterMetricFamily("iopart_disk_ops", "Completed disk requests", labels=[
            *labels, "op"])
        nbytes = CounterMetricFamily("iopart_disk_bytes", "Bytes moved", labels=[*labels, "op"])
        errs = CounterMetricFamily("iopart_disk_errors", "Requests the device failed",
                                   labels=labels)
        refused = CounterMetricFamily("iopart_disk_refused",
                                      "Requests refused before touching the disk",
                                      labels=[*labels, "reason"])
        inflight = GaugeMetricFamily("iopart_disk_inflight", "Requests in flight", labels=labels)
        lat = HistogramMetricFamily("iopart_disk_latency_seconds",
                                    "Server-side request latency", labels=labels)
        bounds = [b / 1e9 for b in hist_bounds_ns()]
        for e in [e for e in list(self.iop.endpoints.values()) if e.kind == "disk"]:
            st = self.iop.server.stats(e.ep)
            lv = [self.iop.name, e.partition, e.device]
            for op, n, b in (("read", st.reads, st.bytes_read), ("write", st.writes,
                                                                   st.bytes_written),
                             ("flush", st.flushes, 0)):
                ops.add_metric([*lv, op], n)
                nbytes.add_metric([*lv, op], b)
            errs.add_metric(lv, st.errors)
            for reason in ("desc", "addr", "range", "ro", "op", "stale"):
                refused.add_metric([*lv, reason], getattr(st, f"refused_{reason}"))
            inflight.add_metric(lv, st.inflight)
            cum, buckets = 0, []
            for bound, n in zip(bounds, st.hist, strict=True):
                cum += n
                buckets.append((repr(bound), cum))
            buckets[-1] = ("+Inf", cum)
            lat.add_metric(lv, buckets, st.lat_sum_ns / 1e9)
        yield from (ops, nbytes, errs, refused, inflight, lat)
        nl = ["io_partition", "partition", "device"]
        frames = CounterMetricFamily("iopart_nic_frames", "Frames through a switch port",
                                     labels=[*nl, "direction"])
        drops = CounterMetricFamily("iopart_nic_dropped", "Frames dropped or refused",
                                    labels=[*nl, "reason"])
        ports = [(e.partition, e.device, e.ep) for e in list(self.iop.endpoints.values())
                 if e.kind == "nic"]
        ports += [("uplink", n, p) for n, (_u, p) in list(self.iop.uplinks.items())]
        for part, dev, port in ports:
            ps = self.iop.switch.stats(port)
            lv = [self.iop.name, part, dev]
            frames.add_metric([*lv, "tx"], ps.tx_frames)
            frames.add_metric([*lv, "rx"], ps.rx_frames)
            for reason in ("rx_dropped", "spoofed", "runts", "oversize", "refused"):
                drops.add_metric([*lv, reason], getattr(ps, reason))
        yield from (frames, drops)


def main() -> None:
    p = argparse.ArgumentParser(prog="iopart-iopartition")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--name", default="iop-a")
    p.add_argument("--config", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(message)s")
    cfg = load_config(args.config).io
    try:
        iop = IoPartition(args.state_dir, args.name, Engine.parse(cfg.engine),
                          cfg.disk_mib << 20, cfg.metrics_port, cfg.spin_us * 1000,
                          cfg.heartbeat_ms)
    except (IopartError, OSError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from exc

    def stop(*_: object) -> None:
        iop.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        iop.run()
    except DiskError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
