"""The command partition: allocation policy and the resource service.

It owns the policy (the `[policy]` of the host config), keeps a copy of the
resource database to choose resources (claim 38) and a copy of the partition
definitions to bootstrap from (claim 40, `definitions.json` in the state dir),
and turns resource-service requests into transactions on its command memory
channel to the ultravisor. It serves JSON-RPC 2.0 (`iopart.rpc`) on
`<state-dir>/command.sock`, one request per line, one at a time.

When the ultravisor goes away the link reads EOF; requests then get UNAVAILABLE
and the link is re-made as soon as the ultravisor is back. On every (re)connect
the definitions are reconciled with the database: a definition missing from the
database is created again, a partition missing from the definitions is adopted.

    python -m iopart.command --state-dir DIR [--config FILE]
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iopart import rpc
from iopart.config import Config, to_dict
from iopart.config import load as load_config
from iopart.descriptors import DescriptorReader
from iopart.drivers.disk import Disk, create_image
from iopart.errors import IopartError
from iopart.ioarea import IO_PARTITIONS
from iopart.resources import MAX_PARTITIONS
from iopart.rpc import POLICY, REFUSED, UNAVAILABLE, RpcError
from iopart.statefile import write_json_atomic
from iopart.uvlink import UltravisorError, UltravisorLink, descriptor_fd

log = logging.getLogger("iopart.command")
MIB = 1 << 20


class Definitions:
    """The command partition's copy of the guest partition definitions."""

    def __init__(self, path: Path, seed: Config) -> None:
        self.path = path
        self.defs: dict[str, dict[str, Any]] = {}
        if path.exists():
            self.defs = json.loads(path.read_text())
        else:
            for d in seed.partitions:
                self.defs[d.name] = {"kind": "guest", "cpu": d.cpu,
                                     "memory": d.memory_mib * MIB}
            self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.defs)

    def put(self, name: str, d: dict[str, Any]) -> None:
        self.defs[name] = d
        self.save()

    def drop(self, name: str) -> None:
        if self.defs.pop(name, None) is not None:
            self.save()


class CommandPartition:
    def __init__(self, state_dir: Path, config: Config) -> None:
        self.state_dir = state_dir
        self.config = config
        self.policy = config.policy
        self.link: UltravisorLink | None = None
        self.descriptors: DescriptorReader | None = None
        self.copy: dict[str, Any] = {}  # our copy of the resource database
        self.defs = Definitions(state_dir / "definitions.json", config)
        self.sel = selectors.DefaultSelector()
        self.sock_path = state_dir / "command.sock"
        self.running = True
        self.started = time.time()
        self.buffers: dict[int, bytearray] = {}
        self.methods: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": self.ping,
            "status": self.status,
            "partition.create": self.create,
            "partition.list": self.list,
            "partition.show": self.show,
            "partition.destroy": self.destroy,
            "partition.set_cpu": self.set_cpu,
            "partition.set_memory": self.set_memory,
            "disk.add": self.disk_add,
            "disk.list": self.disk_list,
            "disk.remove": self.disk_remove,
            "disk.assign": self.disk_assign,
            "disk.unassign": self.disk_unassign,
            "nic.add": self.nic_add,
            "nic.list": self.nic_list,
            "nic.remove": self.disk_remove,
            "audit.list": self.audit_list,
            "audit.show": self.audit_show,
        }

    # -- the ultravisor
    def connect(self, timeout: float = 0.5) -> bool:
        try:
            link = UltravisorLink.connect(self.state_dir, "command", timeout=timeout)
        except IopartError:
            return False
        self.link = link
        self.sel.register(link.fileno(), selectors.EVENT_READ, ("uv", None))
        with contextlib.suppress(OSError, IopartError):
            self.descriptors = DescriptorReader(descriptor_fd(self.state_dir))
        self.refresh()
        self.reconcile()
        log.info("connected to the ultravisor: %d partitions", len(self.copy["partitions"]))
        return True

    def disconnect(self) -> None:
        if self.link is not None:
            self.sel.unregister(self.link.fileno())
            self.link.close()
            self.link = None
        if self.descriptors is not None:
            self.descriptors.close()
            self.descriptors = None
        log.warning("ultravisor gone; reconnecting")

    def uv(self) -> UltravisorLink:
        if self.link is None or not self.link.alive():
            if self.link is not None:
                self.disconnect()
            if not self.connect():
                raise RpcError(UNAVAILABLE, "the ultravisor is not reachable (restarting?)",
                               {"errno": errno.EAGAIN})
        assert self.link is not None
        return self.link

    def refresh(self) -> None:
        self.copy = self.uv().query("snapshot")["snapshot"]

    def transact(self, steps: list[dict[str, Any]], stepwise: bool = False) -> dict[str, Any]:
        link = self.uv()
        try:
            reply = link.transact_stepwise(steps) if stepwise else link.transact(steps)
        except UltravisorError as exc:
            raise RpcError(REFUSED, exc.message, exc.error) from None
        except IopartError as exc:
            self.disconnect()
            raise RpcError(UNAVAILABLE, f"ultravisor link failed: {exc}",
                           {"errno": exc.errno or errno.EPIPE}) from None
        finally:
            with contextlib.suppress(IopartError):
                self.refresh()
        return reply

    def reconcile(self) -> None:
        """Bring definitions and database together after a (re)connect."""
        parts = self.copy["partitions"]
        for name, p in parts.items():
            if p["kind"] == "guest" and name not in self.defs.defs:
                self.defs.put(name, {"kind": p["kind"], "cpu": p["cpu"], "memory": p["memory"]})
        for name, d in list(self.defs.defs.items()):
            if name not in parts:
                try:
                    self._create(name, d["kind"], d["cpu"], d["memory"])
                    log.info("bootstrap: re-created %s from the definitions", name)
                except RpcError as exc:
                    log.warning("bootstrap: cannot create %s: %s", name, exc.message)

    # -- policy: choose resources, refuse what is beyond it
    def _policy(self, cpu: float | None, memory: int | None) -> None:
        if cpu is not None and cpu > self.policy.max_partition_cpu:
            raise RpcError(POLICY, f"cpu {cpu} exceeds the policy's max_partition_cpu "
                           f"{self.policy.max_partition_cpu}", {"field": "cpu",
                                                                "errno": errno.EPERM})
        if memory is not None and memory > self.policy.max_partition_memory_mib * MIB:
            raise RpcError(POLICY, f"memory {memory >> 20} MiB exceeds the policy's "
                           f"max_partition_memory_mib {self.policy.max_partition_memory_mib}",
                           {"field": "memory_mib", "errno": errno.EPERM})

    def _free_index(self) -> int:
        used = {p["index"] for p in self.copy["partitions"].values()}
        for i in range(1, MAX_PARTITIONS):
            if i not in used:
                return i
        raise RpcError(POLICY, "every partition index is taken", {"field": "name",
                                                                  "errno": errno.ENOSPC})

    def _create(self, name: str, kind: str, cpu: float, memory: int) -> dict[str, Any]:
        self._policy(cpu, memory)
        steps = [{"op": "create_partition", "name": name, "kind": kind, "cpu": cpu,
                  "index": self._free_index()}]
        if memory:
            steps.append({"op": "set_memory", "name": name, "memory": memory})
        reply = self.transact(steps, stepwise=True)
        self.defs.put(name, {"kind": kind, "cpu": cpu, "memory": memory})
        return reply

    # -- methods
    def ping(self, _: dict[str, Any]) -> dict[str, Any]:
        up = self.link is not None and self.link.alive()
        return {"pong": True, "pid": os.getpid(), "ultravisor": up}

    def _partition(self, name: str) -> dict[str, Any]:
        p = self.copy.get("partitions", {}).get(name)
        if p is None:
            raise RpcError(REFUSED, f"no partition named {name!r}",
                           {"field": "name", "errno": errno.ENOENT})
        return dict(p)

    def create(self, a: dict[str, Any]) -> dict[str, Any]:
        self.uv()
        name = a["name"]
        if name in self.copy["partitions"]:
            raise RpcError(REFUSED, f"partition {name!r} already exists",
                           {"field": "name", "errno": errno.EEXIST})
        cpu = float(a.get("cpu", self.policy.default_cpu))
        memory = int(a.get("memory_mib", self.policy.default_memory_mib)) * MIB
        reply = self._create(name, a.get("kind", "guest"), cpu, memory)
        return {"tx": reply["tx"], "partition": self._partition(name)}

    def destroy(self, a: dict[str, Any]) -> dict[str, Any]:
        self.uv()
        p = self._partition(a["name"])
        if p["kind"] in ("system", "io"):
            raise RpcError(POLICY, f"{a['name']!r} is a system partition",
                           {"field": "name", "errno": errno.EPERM})
        saved = self.defs.defs.get(a["name"])
        self.defs.drop(a["name"])  # first: a crash after the commit must not resurrect it
        steps = [{"op": "unassign", "device": d, "partition": a["name"]}
                 for d, rec in sorted(self.copy.get("devices", {}).items())
                 if a["name"] in rec["assigned"]]
        try:
            reply = self.transact([*steps, {"op": "destroy_partition", "name": a["name"]}])
        except RpcError:
            if saved is not None:
                self.defs.put(a["name"], saved)
            raise
        return {"tx": reply["tx"], "destroyed": a["name"]}

    def set_cpu(self, a: dict[str, Any]) -> dict[str, Any]:
        self.uv()
        self._partition(a["name"])
        self._policy(a["cpu"], None)
        reply = self.transact([{"op": "set_cpu", "name": a["name"], "cpu": a["cpu"]}])
        self._remember(a["name"])
        return {"tx": reply["tx"], "partition": self._partition(a["name"])}

    def set_memory(self, a: dict[str, Any]) -> dict[str, Any]:
        self.uv()
        self._partition(a["name"])
        memory = a["memory_mib"] * MIB
        self._policy(None, memory)
        reply = self.transact([{"op": "set_memory", "name": a["name"], "memory": memory}])
        self._remember(a["name"])
        return {"tx": reply["tx"], "partition": self._partition(a["name"])}

    def _remember(self, name: str) -> None:
        p = self.copy["partitions"].get(name)
        if p is not None and p["kind"] == "guest":
            self.defs.put(name, {"kind": p["kind"], "cpu": p["cpu"], "memory": p["memory"]})

    def list(self, _: dict[str, Any]) -> dict[str, Any]:
        self.refresh_if_up()
        return {"partitions": list(self.copy.get("partitions", {}).values())}

    def show(self, a: dict[str, Any]) -> dict[str, Any]:
        self.refresh_if_up()
        p = self._partition(a["name"])
        if self.descriptors is not None:
            d = self.descriptors.read(p["index"])
            if d is not None:
                p["descriptor"] = {"seq": d.seq, "generation": d.generation,
                                   "regions": [r.__dict__ for r in d.regions]}
        return p

    def refresh_if_up(self) -> None:
        with contextlib.suppress(RpcError, IopartError):
            self.refresh()

    def status(self, _: dict[str, Any]) -> dict[str, Any]:
        self.refresh_if_up()
        stats: dict[str, Any] = {}
        with contextlib.suppress(RpcError, IopartError):
            stats = self.uv().query("stats")
            stats.pop("ok", None)
        boot: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            boot = json.loads((self.state_dir / "boot.json").read_text())
        io = {n: self._io_report(n) for n, p in self.copy.get("partitions", {}).items()
              if p["kind"] == "io"}
        return {"database": self.copy, "ultravisor": stats, "boot": boot, "io": io,
                "command": {"pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
                            "definitions": len(self.defs.defs)},
                "config": to_dict(self.config)}

    # -- disks: the I/O partitions serve them, assignments say who sees which range
    def _io_report(self, server: str) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            doc: dict[str, Any] = json.loads((self.state_dir / f"{server}.json").read_text())
            return doc
        return {}

    def _io_server(self, name: str) -> str:
        srv = self.copy["partitions"].get(name)
        if srv is None or srv["kind"] != "io":
            raise RpcError(POLICY, f"{name!r} is not an I/O partition",
                           {"field": "server", "errno": errno.ENOENT})
        return name

    def disk_add(self, a: dict[str, Any]) -> dict[str, Any]:
        self.uv()
        server = self._io_server(a.get("server", IO_PARTITIONS[0]))
        path = Path(a["path"]).resolve()
        if a.get("create_mib") and not path.exists():
            create_image(path, a["create_mib"] * MIB)
        try:
            with Disk(path) as disk:
                size = disk.size
        except IopartError as exc:
            raise RpcError(POLICY, exc.message, {"field": "path", "errno": exc.errno}) from None
        reply = self.transact([{"op": "add_device", "name": a["name"], "kind": "disk",
                                "path": str(path), "server": server, "size": size}])
        return {"tx": reply["tx"], "disk": self.copy["devices"][a["name"]]}

    def disk_list(self, _: dict[str, Any]) -> dict[str, Any]:
        self.refresh_if_up()
        disks = [d for d in self.copy.get("devices", {}).values() if d["kind"] == "disk"]
        # whichever I/O partition is active serves every endpoint
        endpoints = [{**e, "served_by": s} for s in IO_PARTITIONS
                     for e in self._io_report(s).get("endpoints", [])]
        return {"disks": disks, "endpoints": endpoints}

    def nic_add(self, a: dict[str, Any]) -> dict[str, Any]:
        self.uv()
        server = self._io_server(a.get("server", IO_PARTITIONS[0]))
        kind, _, arg = a["path"].partition(":")
        if kind not in ("veth", "packet", "tap") or (kind != "veth" and not arg):
            raise RpcError(POLICY, "a NIC is veth[:ADDR/PREFIX], packet:IFNAME or tap:NAME",
                           {"field": "path", "errno": errno.EINVAL})
        reply = self.transact([{"op": "add_device", "name": a["name"], "kind": "nic",
                                "path": a["path"], "server": server}])
        return {"tx": reply["tx"], "nic": self.copy["devices"][a["name"]]}

    def nic_list(self, _: dict[str, Any]) -> dict[str, Any]:
        self.refresh_if_up()
        nics = [dict(d) for d in self.copy.get("devices", {}).values() if d["kind"] == "nic"]
        ports: list[dict[str, Any]] = []
        for srv in IO_PARTITIONS:
            rep = self._io_report(srv)
            ports += [{**p, "served_by": srv} for p in rep.get("nic_ports", [])]
            for d in nics:
                if d["name"] in rep.get("uplinks", {}):
                    d["uplink"] = {**rep["uplinks"][d["name"]], "served_by": srv}
        return {"nics": nics, "ports": ports}

    def disk_remove(self, a: dict[str, Any]) -> dict[str, Any]:
        self.uv()
        reply = self.transact([{"op": "remove_device", "name": a["name"]}])
        return {"tx": reply["tx"], "removed": a["name"]}

    def _free_range(self, dev: dict[str, Any], length: int) -> int:
        """Lowest offset where `length` bytes overlap nobody's writable range."""
        taken = sorted(
            (o, o + (n or dev["size"])) for p, (o, n) in dev["extents"].items()
            if dev["assigned"].get(p) != "ro")
        pos = 0
        for lo, hi in taken:
            if pos + length <= lo:
                break
            pos = max(pos, hi)
        if pos + length > dev["size"]:
            raise RpcError(POLICY, f"no free {length >> 20} MiB range left on {dev['name']} "
                           f"({dev['size'] >> 20} MiB)", {"field": "size_mib",
                                                          "errno": errno.ENOSPC})
        return pos

    def disk_assign(self, a: dict[str, Any]) -> dict[str, Any]:
        self.uv()
        dev = self.copy.get("devices", {}).get(a["device"])
        if dev is None:
            raise RpcError(REFUSED, f"no device named {a['device']!r}",
                           {"field": "device", "errno": errno.ENOENT})
        mode = a.get("mode", "rw")
        offset, length = a.get("offset", 0), a.get("length", 0)
        if "size_mib" in a:
            length = a["size_mib"] * MIB
            offset = self._free_range(dev, length) if mode == "rw" else offset
        reply = self.transact([{"op": "assign", "device": a["device"],
                                "partition": a["partition"], "mode": mode,
                                "offset": offset, "length": length}])
        return {"tx": reply["tx"], "disk": self.copy["devices"][a["device"]]}

    def disk_unassign(self, a: dict[str, Any]) -> dict[str, Any]:
        self.uv()
        reply = self.transact([{"op": "unassign", "device": a["device"],
                                "partition": a["partition"]}])
        return {"tx": reply["tx"], "disk": self.copy["devices"][a["device"]]}

    def audit_list(self, a: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self.uv().query("audit", since=a.get("since", 0), limit=a.get("limit", 100))
        except UltravisorError as exc:
            raise RpcError(REFUSED, exc.message, exc.error) from None
        return {"records": r["records"], "last_seq": r["last_seq"]}

    def audit_show(self, a: dict[str, Any]) -> dict[str, Any]:
        recs = self.audit_list({"since": a["seq"] - 1, "limit": 1})["records"]
        if not recs or recs[0]["seq"] != a["seq"]:
            raise RpcError(REFUSED, f"no audit record {a['seq']}",
                           {"field": "seq", "errno": errno.ENOENT})
        rec: dict[str, Any] = recs[0]
        return rec

    # -- JSON-RPC over the socket
    def dispatch(self, line: bytes) -> dict[str, Any] | None:
        rid: Any = None
        try:
            try:
                req = json.loads(line)
            except ValueError as exc:
                raise RpcError(rpc.PARSE_ERROR, f"not JSON: {exc}") from None
            if not isinstance(req, dict) or req.get("jsonrpc") != "2.0" or not isinstance(
                req.get("method"), str
            ):
                raise RpcError(rpc.INVALID_REQUEST, "not a JSON-RPC 2.0 request")
            rid = req.get("id")
            params = rpc.check_params(req["method"], req.get("params"))
            result = self.methods[req["method"]](params)
        except RpcError as exc:
            err: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.data is not None:
                err["data"] = exc.data
            return {"jsonrpc": "2.0", "id": rid, "error": err}
        except Exception as exc:  # a bug must not take the resource service down
            log.exception("internal error")
            return {"jsonrpc": "2.0", "id": rid,
                    "error": {"code": rpc.INTERNAL_ERROR, "message": f"internal error: {exc}"}}
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    def on_client(self, conn: socket.socket) -> None:
        buf = self.buffers[conn.fileno()]
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.drop(conn)
            return
        buf += data
        if len(buf) > rpc.MAX_LINE:
            self.drop(conn)
            return
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            reply = self.dispatch(line)
            if reply is not None:
                try:
                    conn.setblocking(True)
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                    conn.setblocking(False)
                except OSError:
                    self.drop(conn)
                    return

    def drop(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        self.buffers.pop(conn.fileno(), None)
        conn.close()

    def run(self) -> None:
        self.sock_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(self.sock_path))
        listener.listen(16)
        self.sel.register(listener, selectors.EVENT_READ, ("listen", None))
        self.connect(timeout=10.0)
        log.info("command partition up: resource service on %s", self.sock_path)
        try:
            while self.running:
                for key, _ in self.sel.select(timeout=0.5):
                    kind, _ = key.data
                    if kind == "listen":
                        conn, _ = listener.accept()
                        conn.setblocking(False)
                        self.buffers[conn.fileno()] = bytearray()
                        self.sel.register(conn, selectors.EVENT_READ, ("client", None))
                    elif kind == "uv":
                        if self.link is not None and not self.link.alive():
                            self.disconnect()
                    else:
                        assert isinstance(key.fileobj, socket.socket)
                        self.on_client(key.fileobj)
                if self.link is None:
                    self.connect(timeout=0.2)
        finally:
            listener.close()
            self.sock_path.unlink(missing_ok=True)
            if self.link is not None:
                self.link.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="iopart-command")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--config", type=Path, help="host TOML config (default: built-in defaults)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s command %(message)s")
    cp = CommandPartition(args.state_dir, load_config(args.config))

    def stop(*_: object) -> None:
        cp.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    cp.run()


if __name__ == "__main__":
    main()
