"""The I/O partition: physical disks multiplexed to guests' disk endpoints.

It connects to the ultravisor like every system partition (its command channel
carries its transactions), then asks for the host memory pool, which only a
connected I/O partition gets: it reads and writes client buffers there, and it
formats client channels in an area of the pool the ultravisor set aside for it.
It maps the descriptor table read-only and hands each endpoint's native server
the client's live region table, so every fragment is checked against the memory
the client owns at that moment (claim 20).

A guest's monitor connects to `<name>.sock` (SOCK_SEQPACKET) and asks to attach a
disk. The request is honoured only if that pid is the registered monitor of the
partition and the resource database assigns the disk to it; the endpoint then
addresses exactly the assigned byte range (claim 18). One native thread serves
all endpoints (claim 19). When the monitor's connection closes, the endpoint
goes away.

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
from iopart.channels.channel import ChannelEnd
from iopart.channels.handoff import offer_channel
from iopart.command import write_json_atomic
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
from iopart.drivers.nic import NicError, PacketUplink, TapUplink, VethUplink
from iopart.drivers.vswitch import PortStats, SwitchConfig, VSwitch, format_mac, guest_mac
from iopart.errors import IopartError
from iopart.pool import Extent as PoolExtent
from iopart.pool import PoolArea
from iopart.uvlink import UltravisorError, UltravisorLink, descriptor_fd, request_fd

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


@dataclass
class Endpoint:
    """One guest's disk endpoint: its channel, server end, extent and counters."""

    ep: int
    partition: str
    device: str
    extent: Extent
    mode: str
    direct: bool
    pid: int
    conn: socket.socket
    channel: Channel
    end: ChannelEnd
    kind: str = "disk"
    mac: str = ""

    def describe(self, stats: EndpointStats) -> dict[str, Any]:
        return {"endpoint": self.ep, "partition": self.partition, "device": self.device,
                "offset": self.extent.base, "size": self.extent.size, "mode": self.mode,
                "direct": self.direct, "monitor_pid": self.pid, "stats": stats.to_dict()}

    def describe_nic(self, stats: PortStats) -> dict[str, Any]:
        return {"port": self.ep, "partition": self.partition, "device": self.device,
                "mac": self.mac, "monitor_pid": self.pid, "stats": stats.to_dict()}


Uplink = VethUplink | PacketUplink | TapUplink


class IoPartition:
    def __init__(self, state_dir: Path, name: str, engine: Engine, disk_bytes: int,
                 metrics_port: int, spin_ns: int) -> None:
        self.state_dir = state_dir
        self.name = name
        self.disk_bytes = disk_bytes
        self.link = UltravisorLink.connect(state_dir, name)
        self._ensure_record()
        pool_fd, info = request_fd(state_dir, "?pool")
        try:
            self.pool = mmap.mmap(pool_fd, int(info["size"]), mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(pool_fd)
            raise
        off, length = info["channel_area"]
        self.area = PoolArea(self.pool, pool_fd, PoolExtent(int(off), int(length)))
        self.dtab = DescriptorReader(descriptor_fd(state_dir))
        self.server = BlockServer(self.pool, ServerConfig(engine=engine, spin_ns=spin_ns))
        self.switch = VSwitch(self.pool, SwitchConfig(spin_ns=spin_ns))
        self.uplinks: dict[str, tuple[Uplink, int]] = {}  # device -> uplink, switch port
        self.failed_nics: set[str] = set()
        self.disks: dict[str, Disk] = {}
        self.endpoints: dict[int, Endpoint] = {}  # by connection fd
        self.refused_attaches = 0
        self.sel = selectors.DefaultSelector()
        self.sock_path = state_dir / f"{name}.sock"
        self.running = True
        self.metrics_url = ""
        self._metrics_port = metrics_port

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
        """With no disk of ours in the database, create an image in the state directory."""
        devices = self.snapshot()["devices"]
        if any(d["server"] == self.name and d["kind"] == "disk" for d in devices.values()):
            return
        path = self.state_dir / "disks" / f"{DEFAULT_DISK}.img"
        if not path.exists():
            create_image(path, self.disk_bytes)
        size = os.stat(path).st_size
        try:
            self.link.transact([{"op": "add_device", "name": DEFAULT_DISK, "kind": "disk",
                                 "path": str(path), "server": self.name, "size": size}])
            log.info("default disk %s: %s (%d MiB)", DEFAULT_DISK, path, size >> 20)
        except UltravisorError as exc:
            if exc.errno != errno.EEXIST:
                raise

    def ensure_nics(self) -> None:
        """Open the uplinks of our NICs; with none in the database, make the default one:
        a veth pair whose far end sits in a namespace of its own."""
        devices = self.snapshot()["devices"]
        ours = {n: d for n, d in devices.items() if d["server"] == self.name
                and d["kind"] == "nic"}
        if not ours:
            ours = {DEFAULT_NIC: {"path": "veth"}}
            try:
                self.link.transact([{"op": "add_device", "name": DEFAULT_NIC, "kind": "nic",
                                     "path": "veth", "server": self.name}])
            except UltravisorError as exc:
                if exc.errno != errno.EEXIST:
                    raise
        self.sync_nics(ours)

    def sync_nics(self, ours: dict[str, Any] | None = None) -> None:
        """Open the uplinks of NICs added since, close those of NICs removed."""
        if ours is None:
            ours = {n: d for n, d in self.snapshot()["devices"].items()
                    if d["server"] == self.name and d["kind"] == "nic"}
        for name in sorted(set(self.uplinks) - set(ours)):
            up, port = self.uplinks.pop(name)
            self.switch.remove(port)
            up.close()
            log.info("NIC %s removed", name)
        for name, d in sorted(ours.items()):
            if name in self.uplinks or name in self.failed_nics:
                continue
            try:
                self.open_uplink(name, d["path"])
            except (IopartError, OSError) as exc:
                self.failed_nics.add(name)
                log.error("NIC %s (%s) not available: %s", name, d["path"], exc)

    def open_uplink(self, name: str, path: str) -> None:
        tag = hashlib.sha1(f"{self.state_dir.resolve()}/{name}".encode()).hexdigest()[:6]
        kind, _, arg = path.partition(":")
        up: Uplink
        if kind == "veth":
            up = VethUplink.create(tag, arg or DEFAULT_UPLINK_ADDRESS)
        elif kind == "packet":
            up = PacketUplink.create(arg)
        elif kind == "tap":
            up = TapUplink.create(arg)
        else:
            raise NicError(f"NIC path {path!r}: say veth[:ADDRESS/PREFIX], packet:IFNAME or "
                           "tap:NAME", errno=errno.EINVAL)
        port = self.switch.add_uplink(up.fileno())
        self.uplinks[name] = (up, port)
        log.info("NIC %s: %s, switch port %d", name, up.describe(), port)

    def attach_nic(self, conn: socket.socket, pid: int, part: str, dev: str, index: int,
                   mode: str) -> Endpoint:
        mac = guest_mac(index)
        ch = Channel(self.area, ChannelGeometry(nslots=NIC_CHANNEL_SLOTS, slot_size=128),
                     type_uuid=NIC_CHANNEL_TYPE)
        end = ch.end(Role.SERVER)
        try:
            port = self.switch.add_guest(end, self.dtab.xlate_table(index), mac)
        except IopartError:
            end.close()
            ch.close()
            raise
        e = Endpoint(port, part, dev, Extent(0, 0), mode, False, pid, conn, ch, end, "nic",
                     format_mac(mac))
        conn.send(json.dumps({"ok": True, "kind": "nic", "port": port, "mac": e.mac,
                              "mtu": 1500, "mode": mode, "server": self.name}).encode())
        offer_channel(conn, ch, Role.CLIENT)
        log.info("%s attached %s as switch port %d, MAC %s", part, dev, port, e.mac)
        return e

    def disk(self, name: str, path: str) -> Disk:
        d = self.disks.get(name)
        if d is None or d.path != path:
            d = Disk(path)
            self.disks[name] = d
        return d

    # -- attach / detach
    def attach(self, conn: socket.socket, req: dict[str, Any]) -> Endpoint:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        part, dev = req.get("partition"), req.get("device")
        if not isinstance(part, str) or not isinstance(dev, str):
            raise AttachError("attach needs partition and device names", errno=errno.EINVAL)
        monitors = self.link.query("stats").get("monitors", [])
        if {"partition": part, "pid": pid} not in monitors:
            raise AttachError(f"pid {pid} is not the monitor of partition {part!r}",
                              errno=errno.EPERM)
        snap = self.snapshot()
        d = snap["devices"].get(dev)
        if d is None:
            raise AttachError(f"no device named {dev!r}", errno=errno.ENOENT)
        if d["server"] != self.name:
            raise AttachError(f"{dev!r} is served by {d['server']}, not {self.name}",
                              errno=errno.EXDEV)
        mode = d["assigned"].get(part)
        if mode is None:
            raise AttachError(f"{dev!r} is not assigned to {part!r}", errno=errno.EACCES)
        index = snap["partitions"][part]["index"]
        if d["kind"] == "nic":
            return self.attach_nic(conn, pid, part, dev, index, mode)
        disk = self.disk(dev, d["path"])
        off, length = d["extents"].get(part, [0, 0])
        extent = Extent(int(off), int(length) or disk.size - int(off))
        direct = bool(req.get("direct", False))
        ch = Channel(self.area, ChannelGeometry(nslots=DISK_CHANNEL_SLOTS, slot_size=128),
                     type_uuid=DISK_CHANNEL_TYPE)
        end = ch.end(Role.SERVER)
        try:
            ep = self.server.add(end, self.dtab.xlate_table(index), disk, extent,
                                 read_only=mode == "ro", direct=direct)
        except IopartError:
            end.close()
            ch.close()
            raise
        e = Endpoint(ep, part, dev, extent, mode, direct, pid, conn, ch, end)
        reply = {"ok": True, "endpoint": ep, "size": extent.size, "mode": mode,
                 "direct": direct, "server": self.name}
        conn.send(json.dumps(reply).encode())
        offer_channel(conn, ch, Role.CLIENT)
        log.info("%s attached %s [%d, +%d) %s%s as endpoint %d", part, dev, extent.base,
                 extent.size, mode, " O_DIRECT" if direct else "", ep)
        return e

    def on_connect(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            req = json.loads(conn.recv(_MSG) or b"{}")
            if not isinstance(req, dict):
                raise AttachError("an attach request is a JSON object", errno=errno.EINVAL)
            e = self.attach(conn, req)
        except (ValueError, IopartError, OSError) as exc:
            self.refused_attaches += 1
            err = exc.to_dict() if isinstance(exc, IopartError) else {"message": str(exc)}
            log.warning("attach refused: %s", err.get("message"))
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"ok": False, "error": err}).encode())
            conn.close()
            return
        conn.settimeout(None)
        self.endpoints[conn.fileno()] = e
        self.sel.register(conn, selectors.EVENT_READ, ("client", e))

    def detach(self, e: Endpoint) -> None:
        self.sel.unregister(e.conn)
        self.endpoints.pop(e.conn.fileno(), None)
        if e.kind == "nic":
            ps = self.switch.remove(e.ep)
            what = f"{ps.tx_frames} frames sent, {ps.rx_frames} received, {ps.rx_dropped} " \
                   f"dropped, {ps.spoofed + ps.refused + ps.runts + ps.oversize} refused"
        else:
            st = self.server.remove(e.ep)
            what = f"{st.reads} reads, {st.writes} writes, {st.refused} refused"
        e.end.close()
        e.channel.close()
        e.conn.close()
        log.info("%s detached %s: %s", e.partition, e.device, what)

    # -- counters
    def report(self) -> dict[str, Any]:
        eps = [e.describe(self.server.stats(e.ep)) for e in self.endpoints.values()
               if e.kind == "disk"]
        nics = [e.describe_nic(self.switch.stats(e.ep)) for e in self.endpoints.values()
                if e.kind == "nic"]
        uplinks = {n: {**u.describe(), "port": p, "stats": self.switch.stats(p).to_dict()}
                   for n, (u, p) in self.uplinks.items()}
        return {"name": self.name, "pid": os.getpid(), "engine": self.server.config.engine.name,
                "metrics_url": self.metrics_url, "updated": time.time(),
                "disks": {n: d.info().to_dict() for n, d in self.disks.items()},
                "endpoints": sorted(eps, key=lambda x: x["endpoint"]),
                "nic_ports": sorted(nics, key=lambda x: x["port"]), "uplinks": uplinks,
                "switch": self.switch.switch_stats(),
                "refused_attaches": self.refused_attaches,
                "server": self.server.server_stats()}

    def start_metrics(self) -> None:
        registry = CollectorRegistry()
        registry.register(EndpointCollector(self))
        srv, _thread = start_http_server(self._metrics_port, addr="127.0.0.1", registry=registry)
        self.metrics_url = f"http://127.0.0.1:{srv.server_port}/metrics"

    # -- main loop
    def run(self) -> None:
        self.ensure_default_disk()
        self.ensure_nics()
        self.start_metrics()
        # the report exists before the socket does: `iopart up` waits for the socket
        write_json_atomic(self.state_dir / f"{self.name}.json", self.report())
        self.sock_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(str(self.sock_path))
        listener.listen(64)
        self.sel.register(listener, selectors.EVENT_READ, ("listen", None))
        self.sel.register(self.link.fileno(), selectors.EVENT_READ, ("ultravisor", None))
        log.info("%s up: engine %s, metrics %s", self.name, self.server.config.engine.name,
                 self.metrics_url)
        stats_path = self.state_dir / f"{self.name}.json"
        next_report = 0.0
        try:
            while self.running:
                for key, _ in self.sel.select(timeout=0.5):
                    kind, e = key.data
                    if kind == "listen":
                        self.on_connect(listener)
                    elif kind == "client":
                        self.detach(e)  # a monitor only ever closes its connection
                    elif not self.link.alive():
                        # a new ultravisor has a new pool: start again (boot restarts us)
                        log.warning("the ultravisor is gone: stopping")
                        self.running = False
                if time.monotonic() >= next_report:
                    with contextlib.suppress(IopartError):
                        self.sync_nics()
                    write_json_atomic(stats_path, self.report())
                    next_report = time.monotonic() + 1.0
        finally:
            for e in list(self.endpoints.values()):
                self.detach(e)
            listener.close()
            self.sock_path.unlink(missing_ok=True)
            stats_path.unlink(missing_ok=True)
            self.server.stop()
            self.switch.stop()
            for up, _port in self.uplinks.values():
                up.close()
            for d in self.disks.values():
                d.close()
            self.link.close()


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
                          cfg.disk_mib << 20, cfg.metrics_port, cfg.spin_us * 1000)
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
