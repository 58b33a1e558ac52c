"""The guest seccomp policy on real forked guests: the kernel refuses, the monitor decides.

Each test forks a child that loads the filter and hands its listener to this process,
which serves it in a thread. The child reports what it saw as JSON through a pipe and
leaves with os._exit; whatever happens, the child is killed and the thread stopped.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import random
import select
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn

import pyseccomp
import pytest

from monitor_stubs.seccomp_policy import (
    GuestTrapHandler,
    install_guest_filter,
    receive_listener_fd,
)

pytestmark = pytest.mark.system

Body = Callable[[], dict[str, Any]]
TIMEOUT = 10.0
POLICY_LOGGER = "monitor_stubs.seccomp_policy"
PR_SET_PDEATHSIG = 1


def nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


class Guest:
    """A filtered child and the handler thread that serves it."""

    def __init__(self, pid: int, result_fd: int, handler: GuestTrapHandler) -> None:
        self.pid = pid
        self.result_fd = result_fd
        self.handler = handler
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.reaped = False

    def _serve(self) -> None:
        try:
            self.handler.serve_forever(self.stop)
        except BaseException as e:  # the test asserts there were none
            self.errors.append(e)

    def result(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The child's JSON report (it writes it just before exiting)."""
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"guest {self.pid} did not report within {timeout} s")
            ready, _, _ = select.select([self.result_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.result_fd, 65536)
            if not chunk:
                break
            data += chunk
        report: dict[str, Any] = json.loads(data)
        assert report.pop("ok"), report.get("error")
        return report

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.reaped = True
                return status
            time.sleep(0.01)
        raise TimeoutError(f"guest {self.pid} did not exit within {timeout} s")


def _child(body: Body, sock: socket.socket, result_fd: int) -> NoReturn:
    code = 0
    try:
        install_guest_filter(sock)
        report: dict[str, Any] = {"ok": True, **body()}
    except BaseException as e:
        report, code = {"ok": False, "error": repr(e)}, 1
    try:
        os.write(result_fd, json.dumps(report).encode())
    finally:
        os._exit(code)


@contextmanager
def guest(body: Body, *, serve: bool = True) -> Iterator[Guest]:
    """Fork a child running body under the filter; serve its traps unless told not to."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ours.close()
        os.close(r)
        _child(body, theirs, w)
    theirs.close()
    os.close(w)
    g: Guest | None = None
    try:
        handler = GuestTrapHandler(receive_listener_fd(ours, TIMEOUT), pid)
        g = Guest(pid, r, handler)
        if serve:
            g.thread.start()
        yield g
    finally:
        if g is None or not g.reaped:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if g is not None:
            g.stop.set()
            if g.thread.is_alive():
                g.thread.join(TIMEOUT)
            g.handler.close()
            assert not g.errors, g.errors
        ours.close()
        os.close(r)


def errno_name(fn: Callable[[], object]) -> str:
    """ "ok", or the errno name fn failed with."""
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def libc_call(fn: Callable[[], int]) -> str:
    """Call a libc function that returns -1 and sets errno on failure."""
    ctypes.set_errno(0)
    if fn() == -1:
        return errno.errorcode[ctypes.get_errno()]
    return "ok"


# ---- 1: calls the kernel refuses without asking the monitor ---------------------------


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def refused_calls_body() -> dict[str, Any]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
    libc.ptrace.restype = ctypes.c_long
    libc.syscall.restype = ctypes.c_long
    parent = os.getppid()
    buf = ctypes.create_string_buffer(16)
    local = IoVec(ctypes.addressof(buf), 16)
    # Forked from the parent, so this address is mapped there too: without the filter
    # the read would succeed.
    remote = IoVec(ctypes.addressof(buf), 16)
    out: dict[str, Any] = {
        "process_vm_readv": libc_call(
            lambda: libc.process_vm_readv(
                parent, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0
            )
        ),
        # PEEKDATA, not ATTACH: should the filter fail, it fails harmlessly with ESRCH.
        "ptrace": libc_call(lambda: libc.ptrace(2, parent, None, None)),
        "unshare": libc_call(lambda: libc.unshare(0x04000000)),  # CLONE_NEWUTS
        "io_uring_setup": libc_call(
            lambda: libc.syscall(nr("io_uring_setup"), 1, ctypes.create_string_buffer(120))
        ),
        # size 0 would be EINVAL without the filter; with it, ENOSYS so glibc falls back
        "clone3": libc_call(lambda: libc.syscall(nr("clone3"), None, 0)),
    }
    # ... and glibc's fallback to clone() keeps threads and fork working.
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
    t.start()
    t.join(5)
    out["thread"] = bool(seen) and seen[0] != threading.get_native_id()
    child = os.fork()
    if child == 0:
        os._exit(7)
    out["fork_status"] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    return out


def test_kernel_refuses_reaching_other_memory_and_namespaces() -> None:
    with guest(refused_calls_body) as g:
        report = g.result()
    assert report == {
        "process_vm_readv": "EPERM",
        "ptrace": "EPERM",
        "unshare": "EPERM",
        "io_uring_setup": "EPERM",
        "clone3": "ENOSYS",
        "thread": True,
        "fork_status": 7,
    }


# ---- 2: opens the monitor decides -----------------------------------------------------


def test_open_of_parent_memory_refused_and_normal_open_continues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=POLICY_LOGGER)
    data = tmp_path / "data"
    data.write_bytes(b"guest-visible content\n")
    parent = os.getpid()

    def body() -> dict[str, Any]:
        def read_mem() -> None:
            with open(f"/proc/{parent}/mem", "rb"):
                pass

        out: dict[str, Any] = {"mem": errno_name(read_mem)}
        out["content"] = data.read_text()
        return out

    with guest(body) as g:
        report = g.result()
        counts = g.handler.counts
    assert report == {"mem": "EACCES", "content": "guest-visible content\n"}
    assert counts["openat"]["refused"] == 1
    assert counts["openat"]["handled"] >= 2
    assert sum(c["refused"] for c in counts.values()) == 1
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refusals) == 1
    assert f"guest {g.pid}" in refusals[0]
    assert "openat" in refusals[0]
    assert f"/proc/{parent}/mem" in refusals[0]


def test_open_check_sees_through_paths_links_and_device_numbers(tmp_path: Path) -> None:
    parent = os.getpid()
    (tmp_path / "link").symlink_to(f"/proc/{parent}/mem")
    os.mknod(tmp_path / "memcopy", stat.S_IFCHR | 0o600, os.makedev(1, 1))
    (tmp_path / "plain").write_text("x")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def body() -> dict[str, Any]:
        def try_open(path: str, dir_fd: int | None = None) -> str:
            return errno_name(lambda: os.close(os.open(path, os.O_RDONLY, dir_fd=dir_fd)))

        def openat2_in_root(dirfd: int, path: bytes) -> str:
            how = (ctypes.c_uint64 * 3)(os.O_RDONLY, 0, 0x10)  # RESOLVE_IN_ROOT

            def call() -> int:
                fd = int(libc.syscall(nr("openat2"), dirfd, path, how, 24))
                if fd >= 0:
                    os.close(fd)
                return fd

            return libc_call(call)

        plain = os.open(tmp_path / "plain", os.O_RDONLY)
        proc_parent = os.open(f"/proc/{parent}", os.O_RDONLY | os.O_DIRECTORY)
        out = {
            "self_mem": try_open("/proc/self/mem"),
            "thread_self_mem": try_open("/proc/thread-self/mem"),
            "dotted": try_open(f"//proc/./self/../{parent}/mem"),
            "symlink": try_open(str(tmp_path / "link")),
            "mknod_copy": try_open(str(tmp_path / "memcopy")),
            "kcore": try_open("/proc/kcore"),
            "pagemap": try_open("/proc/self/pagemap"),
            "dirfd": try_open("mem", dir_fd=proc_parent),
            "openat2_in_root": openat2_in_root(proc_parent, b"../../mem"),
            "parent_fd": try_open(f"/proc/{parent}/fd/0"),
            # not memory: allowed
            "parent_status": try_open(f"/proc/{parent}/status"),
            "own_fd": try_open(f"/proc/self/fd/{plain}"),
        }
        os.chdir("/proc")
        out["relative"] = try_open(f"{parent}/mem")
        return out

    with guest(body) as g:
        report = g.result()
        counts = g.handler.counts
    allowed = {"parent_status", "own_fd"}
    assert {k for k, v in report.items() if v == "ok"} == allowed, report
    assert all(v == "EACCES" for k, v in report.items() if k not in allowed), report
    refused = sum(c["refused"] for c in counts.values())
    assert refused == len(report) - len(allowed)
    assert counts["openat2"]["refused"] == 1


# ---- 3: signals -----------------------------------------------------------------------


def signals_body() -> dict[str, Any]:
    parent = os.getppid()
    out: dict[str, Any] = {
        "parent": errno_name(lambda: os.kill(parent, 0)),
        "self": errno_name(lambda: os.kill(os.getpid(), 0)),
        "thread": errno_name(
            lambda: signal.pthread_kill(threading.get_ident(), 0)  # tgkill
        ),
        "everyone": errno_name(lambda: os.kill(-1, 0)),
        # our group is the test runner's, which is not ours to signal
        "shared_group": errno_name(lambda: os.kill(0, 0)),
    }
    pidfd = os.pidfd_open(parent)
    out["parent_pidfd"] = errno_name(lambda: signal.pidfd_send_signal(pidfd, 0))
    os.close(pidfd)

    grandchild = os.fork()
    if grandchild == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        time.sleep(20)
        os._exit(0)
    out["grandchild"] = errno_name(lambda: os.kill(grandchild, signal.SIGTERM))
    _, status = os.waitpid(grandchild, 0)
    out["grandchild_signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None

    os.setpgid(0, 0)
    out["own_group"] = errno_name(lambda: os.kill(0, 0))
    out["own_group_by_id"] = errno_name(lambda: os.kill(-os.getpid(), 0))
    return out


def test_signals_stay_inside_the_guest_tree() -> None:
    with guest(signals_body) as g:
        report = g.result()
        counts = g.handler.counts
    assert report == {
        "parent": "EPERM",
        "self": "ok",
        "thread": "ok",
        "everyone": "EPERM",
        "shared_group": "EPERM",
        "parent_pidfd": "EPERM",
        "grandchild": "ok",
        "grandchild_signal": signal.SIGTERM,
        "own_group": "ok",
        "own_group_by_id": "ok",
    }
    assert counts["kill"]["refused"] == 3
    assert counts["pidfd_send_signal"]["refused"] == 1


# ---- 4: the handler's lifetime --------------------------------------------------------


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_handler_stops_within_a_second_of_guest_exit(reap: bool) -> None:
    with guest(dict) as g:
        g.result()
        if reap:
            g.wait_exit()
        else:
            # still a zombie: the filter is not released yet, the pidfd already says so
            deadline = time.monotonic() + TIMEOUT
            while Path(f"/proc/{g.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                assert time.monotonic() < deadline
                time.sleep(0.01)
        exited = time.monotonic()
        g.thread.join(1.0)
        assert not g.thread.is_alive()
        assert time.monotonic() - exited < 1.0


def waits_in_open_body() -> dict[str, Any]:
    # Blocks until the monitor answers, which it never does here.
    os.close(os.open("/", os.O_RDONLY))
    return {}


def sleeper_body() -> dict[str, Any]:
    time.sleep(30)
    return {}


def test_stop_event_and_vanished_guest() -> None:
    # A live guest: the stop event ends serving within a second.
    with guest(sleeper_body) as g:
        time.sleep(0.3)
        g.stop.set()
        t0 = time.monotonic()
        g.thread.join(1.0)
        assert not g.thread.is_alive()
        assert time.monotonic() - t0 < 1.0

    # A guest killed while its trap is queued, before anyone serves it: no crash, no hang.
    with guest(waits_in_open_body, serve=False) as g:
        time.sleep(0.3)
        os.kill(g.pid, signal.SIGKILL)
        g.wait_exit()
        t0 = time.monotonic()
        g.thread.start()
        g.thread.join(1.0)
        assert not g.thread.is_alive()
        assert time.monotonic() - t0 < 1.0
        assert sum(c["handled"] for c in g.handler.counts.values()) == 0


def open_loop_body() -> dict[str, Any]:
    def loop() -> None:
        while True:
            os.close(os.open("/", os.O_RDONLY))

    for _ in range(3):
        threading.Thread(target=loop, daemon=True).start()
    loop()
    return {}


def test_guest_killed_mid_trap_never_breaks_the_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=POLICY_LOGGER)
    rng = random.Random(1234)
    for _ in range(10):
        with guest(open_loop_body) as g:
            time.sleep(rng.uniform(0.01, 0.1))
            os.kill(g.pid, signal.SIGKILL)
            g.wait_exit()
            g.thread.join(1.0)
            assert not g.thread.is_alive()
            assert g.handler.counts["openat"]["handled"] > 0
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not problems, [r.getMessage() for r in problems]
