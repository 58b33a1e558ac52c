"""The monitor stub: what runs before a process guest's own code, and watches it.

    python -m monitor_stubs.stub --state-dir DIR --name GUEST [--direct] -- python3 PROG ...

1. Asks the ultravisor for the partition's memory (`?monitor GUEST`): it gets the pool
   fd and the partition's regions, maps exactly those extents at base + PRPA, and
   closes the pool fd. The ultravisor puts this process in the partition's cgroup
   (its CPU share) and watches it with a pidfd.
2. Attaches every disk the database assigns to the partition, at the I/O partition
   that serves it; each attach gives a channel end (only its pages are mapped).
3. Forks the guest. The guest closes every fd but stdio and its doorbells, loads
   the seccomp filter (monitor_stubs.seccomp_policy) and hands the listener to the
   monitor, then runs the guest program in this same process image, so the memory
   map and the channels stay (an exec would drop them). Guest programs are Python:
   a script, `-m module` or `-c code`; they reach their disk through
   `iopart.client.open_disk()`.
4. The monitor answers the guest's trapped calls until it exits, and exits with the
   guest's status.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import runpy
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pyroute2 import netns

from iopart.channels.handoff import AcceptedChannel, accept_channel
from iopart.channels.xlate import Region
from iopart.client import DiskEndpoint, GuestMemory, NicEndpoint, NicLoops, attach
from iopart.drivers.nic import configure, move_to_netns, open_tap, remove_netns
from iopart.drivers.vswitch import parse_mac
from iopart.errors import ChannelError, HandoffError, IopartError
from iopart.ioarea import IO_PARTITIONS
from iopart.uvlink import request_fd
from monitor_stubs.seccomp_policy import (
    GuestTrapHandler,
    install_guest_filter,
    receive_listener_fd,
)

log = logging.getLogger("iopart.monitor")
_MSG = 65536
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)
ATTACH_WAIT_S = 15.0


class MonitorError(IopartError):
    kind = "monitor"


def take_memory(state_dir: Path, name: str) -> tuple[GuestMemory, dict[str, Any]]:
    """The partition's extents, mapped at their PRPA layout; the pool fd is closed."""
    try:
        pool_fd, info = request_fd(state_dir, f"?monitor {name}", timeout=10)
    except ChannelError as exc:
        raise MonitorError(exc.message, errno=exc.errno) from exc
    try:
        regions = [Region(**r) for r in info["regions"]]
        memory = GuestMemory.map(pool_fd, regions)
    finally:
        os.close(pool_fd)  # the guest never holds the pool
    return memory, info


def attach_device(state_dir: Path, name: str, disk: dict[str, Any],
                  direct: bool) -> tuple[dict[str, Any], AcceptedChannel, socket.socket]:
    """Attach one assigned device at the active I/O partition: its reply and channel end.

    The device's server is asked first; a standby names the active one, and an I/O
    partition that is down (restarting, or dying mid-attach) is skipped for the
    other, until ATTACH_WAIT_S has passed."""
    order = [disk["server"], *[n for n in IO_PARTITIONS if n != disk["server"]]]
    deadline = time.monotonic() + ATTACH_WAIT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        for server in order:
            try:
                return _attach_at(state_dir, server, name, disk, direct)
            except _TryElsewhere as exc:
                last = exc
                if exc.active in order:  # the standby named the active one: it goes first
                    order = [exc.active, *[n for n in order if n != exc.active]]
        time.sleep(0.05)
    raise MonitorError(f"cannot attach {disk['device']}: {last}", errno=errno.EHOSTUNREACH)


class _TryElsewhere(Exception):
    def __init__(self, why: str, active: str = "") -> None:
        super().__init__(why)
        self.active = active


def _attach_at(state_dir: Path, server: str, name: str, disk: dict[str, Any],
               direct: bool) -> tuple[dict[str, Any], AcceptedChannel, socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(10)
        try:
            sock.connect(str(state_dir / f"{server}.sock"))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise _TryElsewhere(f"{server} is not running") from exc
        sock.send(json.dumps({"partition": name, "device": disk["device"],
                              "direct": direct}).encode())
        raw = sock.recv(_MSG)
        if not raw:
            raise _TryElsewhere(f"{server} closed the connection")
        reply = json.loads(raw)
        if not reply.get("ok"):
            err = reply.get("error", {})
            if err.get("errno") == errno.EAGAIN:
                raise _TryElsewhere(err.get("message", "standby"), reply.get("active", ""))
            why = err.get("message", "the I/O partition refused")
            raise MonitorError(f"cannot attach {disk['device']}: {why}", errno=errno.EACCES)
        acc = accept_channel(sock)
        sock.settimeout(None)
    except (ConnectionResetError, BrokenPipeError, HandoffError) as exc:
        sock.close()
        raise _TryElsewhere(f"{server} went away during the attach: {exc}") from exc
    except OSError as exc:
        sock.close()
        raise MonitorError(f"cannot attach {disk['device']} at {server}: {exc}",
                           errno=exc.errno or 0) from exc
    except (IopartError, ValueError, _TryElsewhere):
        sock.close()
        raise
    return reply, acc, sock


class GuestNetns:
    """The guest's network namespace: a TAP carrying the guest's MAC, bridged by a
    native loop in the monitor to the guest's switch port, so unmodified programs
    (ping, socat, iperf3) in the namespace use the shared NIC."""

    def __init__(self, guest: str, mac: str, address: str | None) -> None:
        tag = hashlib.sha1(guest.encode()).hexdigest()[:8]
        self.ns, self.tap = f"iopart-g-{guest}"[:40], f"iot{tag}"
        remove_netns(self.ns)
        netns.create(self.ns)
        try:
            self.tap_fd = open_tap(self.tap)
            move_to_netns(self.tap, self.ns)
            configure(self.ns, self.tap, address, mac)
        except Exception:
            remove_netns(self.ns)
            raise
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.counters: list[int] = []
        self.thread: threading.Thread | None = None

    def start_bridge(self, loops: NicLoops) -> None:
        def run() -> None:
            self.counters = loops.bridge(self.tap_fd, self.stop_fd)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def ns_fd(self) -> int:
        return os.open(f"/run/netns/{self.ns}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.thread is not None:
            os.eventfd_write(self.stop_fd, 1)
            self.thread.join(5)
        os.close(self.stop_fd)
        os.close(self.tap_fd)
        remove_netns(self.ns)


def run_program(argv: list[str]) -> int:
    """Run a Python guest program in this process; its exit status."""
    prog = argv[1:]
    sys.argv = prog[:] if prog else [""]
    try:
        if prog and prog[0] == "-m" and len(prog) > 1:
            sys.argv = prog[1:]
            runpy.run_module(prog[1], run_name="__main__", alter_sys=True)
        elif prog and prog[0] == "-c" and len(prog) > 1:
            sys.argv = ["-c", *prog[2:]]
            exec(compile(prog[1], "<guest>", "exec"), {"__name__": "__main__"})
        elif prog:
            sys.argv = prog[:]
            runpy.run_path(prog[0], run_name="__main__")
        else:
            print("monitor: no guest program given", file=sys.stderr)
            return 2
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def is_python(argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).name.startswith("python")


def guest_main(argv: list[str], keep: list[int], report: socket.socket, ns_fd: int) -> int:
    """In the forked guest: enter its namespace, shed fds, load the filter, run the
    program: Python in this process image (the memory map and channels stay), anything
    else by exec (it keeps the network namespace and the CPU share, not the channels)."""
    if ns_fd >= 0:
        if libc.setns(ns_fd, CLONE_NEWNET) != 0:
            print(f"monitor: cannot enter the guest's namespace: "
                  f"{os.strerror(ctypes.get_errno())}", file=sys.stderr)
            return 1
        os.close(ns_fd)
    keep_set = sorted({0, 1, 2, report.fileno(), *keep})
    lo = 0
    for fd in keep_set:
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 65536)
    install_guest_filter(report)
    report.close()
    if is_python(argv):
        return run_program(argv)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"monitor: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
    return 127


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iopart-monitor", description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--name", required=True, help="the guest partition")
    p.add_argument("--direct", action="store_true", help="disk I/O with O_DIRECT")
    p.add_argument("--netns", action="store_true",
                   help="a network namespace with a TAP bridged to the guest's NIC")
    p.add_argument("--ip", help="address/prefix of the TAP in the namespace")
    p.add_argument("program", nargs=argparse.REMAINDER)
    a = p.parse_args(args)
    prog = a.program[1:] if a.program[:1] == ["--"] else a.program
    logging.basicConfig(level=logging.INFO, format="%(asctime)s monitor %(message)s")
    # the monitor follows the `iopart guest run` that started it (its guest follows it)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if not prog:
        print("iopart monitor: no guest program given", file=sys.stderr)
        return 2
    held: list[tuple[AcceptedChannel, socket.socket]] = []
    space: GuestNetns | None = None
    try:
        memory, info = take_memory(a.state_dir, a.name)
        disks: dict[str, DiskEndpoint] = {}
        nics: dict[str, NicEndpoint] = {}
        for d in info.get("disks", []):
            reply, acc, sock = attach_device(a.state_dir, a.name, d, a.direct)
            held.append((acc, sock))
            if reply.get("kind") == "nic":
                mac = parse_mac(reply["mac"])
                if a.netns and space is None:
                    space = GuestNetns(a.name, reply["mac"], a.ip)
                    space.start_bridge(NicLoops(acc.end, memory, mac))
                else:
                    nics[d["device"]] = NicEndpoint(acc.end, memory, mac, name=d["device"])
            else:
                disks[d["device"]] = DiskEndpoint(acc.end, memory, int(reply["size"]),
                                                  d["device"], reply["mode"] == "ro")
        if a.netns and space is None:
            raise MonitorError(f"--netns needs a NIC assigned to {a.name}", errno=errno.EINVAL)
    except (IopartError, OSError) as exc:
        print(f"iopart monitor: {getattr(exc, 'message', exc)}", file=sys.stderr)
        for acc, sock in held:
            acc.close()
            sock.close()
        if space is not None:
            space.close()
        return 1
    keep = [fd for acc, _s in held for fd in (acc.doorbells.req, acc.doorbells.rsp)]
    ns_fd = space.ns_fd() if space is not None else -1
    mon_sock, guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # a guest never outlives its monitor: nothing would answer its traps
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            mon_sock.close()
            for fd in keep:
                os.set_inheritable(fd, True)
            attach(memory, disks, nics)
            if ns_fd >= 0:
                os.set_inheritable(ns_fd, True)
            code = guest_main(prog, keep, guest_sock, ns_fd)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    guest_sock.close()
    if ns_fd >= 0:
        os.close(ns_fd)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: os.kill(pid, signal.SIGINT))
    stop = threading.Event()
    handler: GuestTrapHandler | None = None
    try:
        listener = receive_listener_fd(mon_sock, timeout=10)
        handler = GuestTrapHandler(listener, pid, logger=log)
        threading.Thread(target=handler.serve_forever, args=(stop,), daemon=True).start()
    except (OSError, ValueError) as exc:
        log.error("guest %s gave no seccomp listener (%s): stopping it", a.name, exc)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    stop.set()
    if handler is not None:
        refused = {k: v["refused"] for k, v in handler.counts.items() if v.get("refused")}
        if refused:
            log.warning("guest %s: refused calls %s", a.name, refused)
        handler.close()
    if space is not None:
        space.close()
        log.info("guest %s: bridge to the switch %d frames, to the TAP %d", a.name,
                 *(space.counters[:2] or [0, 0]))
    for acc, sock in held:
        acc.close()
        sock.close()
    memory.close()
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(
        status)


if __name__ == "__main__":
    sys.exit(main())
