"""Seccomp policy of a process guest: what the kernel refuses, what the monitor decides.

This module owns three things:

* the filter a guest loads into itself before its own code runs (`build_guest_filter`,
  `install_guest_filter`): calls that would reach memory or hardware outside the
  partition are refused with EPERM by the kernel; `open`-family and signal-sending
  calls trap to the monitor (SECCOMP_RET_USER_NOTIF); everything else is allowed;
* the hand-over of the notification listener from guest to monitor over SCM_RIGHTS
  (`install_guest_filter` sends it, `receive_listener_fd` takes it);
* the monitor-side `GuestTrapHandler`, which answers each trap: refuse (EACCES for
  opens of other processes' or raw memory, EPERM for signals leaving the guest's
  process tree) or let the kernel perform the call (SECCOMP_USER_NOTIF_FLAG_CONTINUE).

Limits, on purpose and to keep in mind:

* CONTINUE makes the kernel re-read the guest's arguments after the monitor looked at
  them. A guest with a second thread (or a symlink it swaps) can change the path or the
  fd in between. The open and signal checks are therefore defence in depth; the hard
  boundary is the EPERM list and the guest's credentials (run guests unprivileged).
* Paths and pids are interpreted in the monitor's mount and pid namespaces; the handler
  refuses to start for a guest in other namespaces rather than decide wrongly. The guest
  cannot change namespaces afterwards (setns, unshare and clone with CLONE_NEW* are
  refused).
* Raw block devices and mknod are left to the device cgroup, not to this filter.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import re
import select
import socket
import stat
import threading
from typing import Any, NamedTuple

import pyseccomp

__all__ = [
    "CLONE_NAMESPACE_FLAGS",
    "OPEN_SYSCALLS",
    "REFUSED_SYSCALLS",
    "SECCOMP_USER_NOTIF_FLAG_CONTINUE",
    "SIGNAL_SYSCALLS",
    "GuestTrapHandler",
    "build_guest_filter",
    "install_guest_filter",
    "receive_listener_fd",
]

log = logging.getLogger(__name__)

# Refused with EPERM by the kernel, no round trip. Names libseccomp does not know on
# this architecture (vm86 on x86_64, open on aarch64, ...) are skipped.
REFUSED_SYSCALLS: tuple[str, ...] = (
    # other processes' memory and resources
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise",
    "process_mrelease", "pidfd_getfd", "kcmp", "move_pages", "migrate_pages",
    # the kernel itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "bpf", "perf_event_open", "lookup_dcookie", "nfsservctl", "uselib",
    "_sysctl", "syslog", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "keyctl", "add_key", "request_key",
    # NUMA placement: pages on nodes the partition was not given
    "mbind", "set_mempolicy", "set_mempolicy_home_node",
    # filesystem views; open_by_handle_at bypasses path checks entirely
    "mount", "umount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "open_tree_attr", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init",
    # namespaces: paths and pids must keep meaning what the monitor thinks they mean
    "setns", "unshare",
    # I/O ports and PCI config space
    "iopl", "ioperm", "pciconfig_read", "pciconfig_write", "pciconfig_iobase",
    "vm86", "vm86old",
    # userfaultfd lets a guest stall the monitor's reads of its memory; io_uring would
    # open files without passing through the open trap below
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    # host clock and terminal
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "vhangup",
)  # fmt: skip

# Trapped to the monitor: the path decides.
OPEN_SYSCALLS: tuple[str, ...] = ("open", "creat", "openat", "openat2")
# Trapped to the monitor: the target decides.
SIGNAL_SYSCALLS: tuple[str, ...] = (
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_send_signal",
)  # fmt: skip

# clone() creating a namespace is unshare() by another name.
CLONE_NAMESPACE_FLAGS: tuple[int, ...] = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)

# Syscalls newer than libseccomp 2.5.4's table. From 424 on, numbers are the same on
# every architecture but alpha.
_NEWER_SYSCALLS: dict[str, int] = {"open_tree_attr": 467}

SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
PATH_MAX = 4096
_AT_FDCWD = -100
_RESOLVE_IN_ROOT = 0x10
_PIDFD_SIGNAL_THREAD_OR_GROUP = 0x3  # PIDFD_SIGNAL_THREAD | PIDFD_SIGNAL_THREAD_GROUP
_HELLO = b"seccomp-listener"

# /proc entries that expose a process's memory: refused for every pid, the guest's own too.
_PROC_MEMORY = frozenset({b"mem", b"map_files", b"pagemap"})
# /proc entries that reach into a process's files and memory: refused outside the guest tree.
_PROC_FOREIGN = frozenset({b"fd", b"cwd", b"root", b"environ"})
# Top-level /proc files that show physical memory.
_PROC_PHYSICAL = frozenset({b"kcore", b"kmem", b"kpagecount", b"kpageflags", b"kpagecgroup"})
# Character devices onto physical memory, kernel memory, I/O ports (by number, so a copy
# made with mknod elsewhere is caught too).
_RAW_MEMORY_DEVICES = frozenset({(1, 1), (1, 2), (1, 4)})
_MSR_MAJOR = 202
# PCI BARs, option ROM and config space under sysfs.
_SYSFS_PCI_RAW = re.compile(rb"(resource\d*(_wc)?|rom|config)")


# ---- kernel ABI for the listener ------------------------------------------------------


class _SeccompData(ctypes.Structure):
    _fields_ = [
        ("nr", ctypes.c_int32),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    ]


class _Notif(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("data", _SeccompData),
    ]


class _NotifResp(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("val", ctypes.c_int64),
        ("error", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
    ]


def _iowr(nr: int, size: int, *, read: bool = True) -> int:
    """Generic Linux ioctl encoding (x86, arm, arm64, riscv, s390) for magic '!'."""
    direction = 3 if read else 1  # _IOC_READ|_IOC_WRITE, or _IOC_WRITE alone
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_NOTIF_RECV = _iowr(0, ctypes.sizeof(_Notif))
_NOTIF_SEND = _iowr(1, ctypes.sizeof(_NotifResp))
_NOTIF_ID_VALID = _iowr(2, 8, read=False)
_GENERIC_IOCTL_MACHINES = ("x86_64", "i686", "aarch64", "armv7l", "riscv64", "s390x")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.c_uint64) -> None:
    # ctypes, not fcntl.ioctl: the GIL is released and errno comes back unmangled
    # (libseccomp 2.5's seccomp_notify_* turn every failure into ECANCELED).
    if _libc.ioctl(fd, request, ctypes.byref(arg)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# ---- the filter (runs in the guest) ---------------------------------------------------


def _resolve(name: str) -> int:
    """Native syscall number, or -1 when this architecture has no such call."""
    nr = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
    if nr < 0 and name in _NEWER_SYSCALLS and platform.machine() != "alpha":
        return _NEWER_SYSCALLS[name]
    return nr  # negative: unknown, or a pseudo-number for another architecture


def build_guest_filter() -> Any:
    """The guest's filter as a `pyseccomp.SyscallFilter`, not loaded yet."""
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    # Loading a filter unprivileged needs no_new_privs; set it explicitly rather than
    # rely on libseccomp's default.
    filt.set_attr(pyseccomp.Attr.CTL_NNP, 1)
    # i386 calls from a 64-bit guest (int 0x80) and x32 calls would dodge every rule.
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for name in REFUSED_SYSCALLS:
        if (nr := _resolve(name)) >= 0:
            filt.add_rule(pyseccomp.ERRNO(errno.EPERM), nr)
    for name in OPEN_SYSCALLS + SIGNAL_SYSCALLS:
        if (nr := _resolve(name)) >= 0:
            filt.add_rule(pyseccomp.NOTIFY, nr)
    clone_flags_arg = 1 if platform.machine().startswith("s390") else 0
    for flag in CLONE_NAMESPACE_FLAGS:
        filt.add_rule(
            pyseccomp.ERRNO(errno.EPERM),
            _resolve("clone"),
            pyseccomp.Arg(clone_flags_arg, pyseccomp.MASKED_EQ, flag, flag),
        )
    # clone3 takes its flags through a pointer seccomp cannot read. ENOSYS, not EPERM:
    # glibc then falls back to clone(), whose flags the rules above do see.
    if (nr := _resolve("clone3")) >= 0:
        filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), nr)
    return filt


def _notify_fd(filt: Any) -> int:
    getter = getattr(filt, "get_notify_fd", None)
    if getter is not None:  # the official libseccomp binding, later pyseccomp
        return int(getter())
    # pyseccomp 0.1.2 has no getter; libseccomp keeps the listener it asked the kernel for.
    fd = int(pyseccomp._libseccomp.seccomp_notify_fd(filt._filter))
    if fd < 0:
        raise OSError(-fd, "no seccomp listener after load: " + os.strerror(-fd))
    return fd


def install_guest_filter(report_sock: socket.socket) -> None:
    """Load the guest filter into the calling process and hand the listener to the monitor.

    Call in the guest, single-threaded, after its memory is mapped and before guest code.
    Until the monitor serves the listener, trapped calls wait; if the hand-over fails the
    listener is closed and they fail with ENOSYS instead, and the error is raised.
    """
    filt = build_guest_filter()
    filt.load()
    fd = _notify_fd(filt)
    try:
        # Nothing between load() and here may open a file: that open would wait for a
        # monitor that has not received the listener yet.
        socket.send_fds(report_sock, [_HELLO], [fd])
    finally:
        os.close(fd)


def receive_listener_fd(sock: socket.socket, timeout: float = 5.0) -> int:
    """Monitor side of the hand-over: the listener fd the guest sent (close-on-exec)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        raise TimeoutError(f"no seccomp listener from the guest within {timeout} s")
    data, fds, _flags, _addr = socket.recv_fds(sock, len(_HELLO), 4, socket.MSG_CMSG_CLOEXEC)
    if data == _HELLO and len(fds) == 1:
        try:
            if os.readlink(f"/proc/self/fd/{fds[0]}") == "anon_inode:seccomp notify":
                return fds[0]
        except OSError:
            pass
    for fd in fds:
        os.close(fd)
    raise ConnectionError(f"expected one seccomp listener, got {data!r} with {len(fds)} fd(s)")


# ---- the handler (runs in the monitor) ------------------------------------------------


class _Vanished(Exception):
    """The trapped task is gone or its notification no longer valid: nobody to answer."""


class _Verdict(NamedTuple):
    error: int  # 0: let the kernel run the call (CONTINUE)
    subject: str  # what was looked at, for the log


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _status_field(pid: int, key: bytes) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ppid_and_pgrp(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        # comm may hold spaces and parentheses: fields start after the last ')'.
        fields = data[data.rindex(b")") + 2 :].split()
        return int(fields[1]), int(fields[2])
    except (OSError, ValueError, IndexError):
        return None


def _normalize(path: bytes) -> bytes:
    norm = os.path.normpath(path)
    return b"/" + norm.lstrip(b"/") if norm.startswith(b"/") else norm


def _join_in_root(root: bytes, path: bytes) -> bytes:
    """openat2 RESOLVE_IN_ROOT: '/' is root and '..' never climbs above it."""
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part == b"..":
            if parts:
                parts.pop()
        elif part not in (b"", b"."):
            parts.append(part)
    return root.rstrip(b"/") + b"/" + b"/".join(parts)


def _mount_points(fstype: str) -> tuple[bytes, ...]:
    points: list[bytes] = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            if fields[sep + 1] == fstype.encode():
                # mountinfo escapes spaces and the like as \ooo octal
                points.append(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4]))
    return tuple(points)


def _under(path: bytes, mount: bytes) -> list[bytes] | None:
    """Components of path below mount, or None when path is not below it."""
    if mount == b"/":
        return [c for c in path.split(b"/") if c]
    if path == mount or path.startswith(mount + b"/"):
        return [c for c in path[len(mount) :].split(b"/") if c]
    return None


class GuestTrapHandler:
    """Answers the seccomp notifications of one guest, in the monitor.

    Takes ownership of `listener_fd` (close() closes it). Run `serve_forever(stop)` in a
    thread; it returns when `stop` is set, when the guest process has exited (zombie or
    reaped) or when no task uses the filter any more. Descendants of the guest share its
    filter: once the listener is closed their trapped calls fail with ENOSYS.
    """

    def __init__(
        self,
        listener_fd: int,
        guest_pid: int,
        *,
        poll_interval: float = 0.2,
        logger: logging.Logger | None = None,
    ) -> None:
        if platform.machine() not in _GENERIC_IOCTL_MACHINES:
            raise NotImplementedError(f"seccomp ioctl numbers not known for {platform.machine()}")
        self.listener_fd = listener_fd
        self.guest_pid = guest_pid
        self.poll_interval = poll_interval
        self.log = logger or log
        self._lock = threading.Lock()
        self._names: dict[int, str] = {}
        for name in OPEN_SYSCALLS + SIGNAL_SYSCALLS:
            if (nr := _resolve(name)) >= 0:
                self._names[nr] = name
        self._counts = {name: {"handled": 0, "refused": 0} for name in self._names.values()}
        self._proc_mounts = _mount_points("proc")
        self._sys_mounts = _mount_points("sysfs")
        self._halt = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._pidfd: int | None
        try:
            # A pidfd says "exited" exactly once, for the whole thread group, and cannot
            # be fooled by pid reuse the way polling /proc/<pid> could.
            self._pidfd = os.pidfd_open(guest_pid)
        except ProcessLookupError:
            self._pidfd = None  # already gone: serve_forever returns at once
        if self._pidfd is not None:
            try:
                self._require_same_namespaces()
            except BaseException:
                os.close(self._pidfd)  # the caller keeps listener_fd when we raise
                raise

    def _require_same_namespaces(self) -> None:
        for ns in ("pid", "mnt"):
            try:
                theirs = os.stat(f"/proc/{self.guest_pid}/ns/{ns}")
            except FileNotFoundError:
                return  # exited meanwhile; the pidfd will say so
            ours = os.stat(f"/proc/self/ns/{ns}")
            if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
                raise ValueError(
                    f"guest {self.guest_pid} is in another {ns} namespace; this handler "
                    "reads pids and paths in the monitor's"
                )

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Per trapped syscall: "handled" (every answered trap) and "refused" (of those).

        Calls refused by the kernel itself (the EPERM list) never reach the monitor and
        are not counted here.
        """
        with self._lock:
            return {name: dict(c) for name, c in self._counts.items()}

    # -- loop

    def serve_forever(self, stop_event: threading.Event) -> None:
        if self._closed:
            raise RuntimeError("handler is closed")
        self._idle.clear()
        try:
            if self._pidfd is None:
                self.log.info("guest %d: gone before serving", self.guest_pid)
                return
            poller = select.poll()
            poller.register(self.listener_fd, select.POLLIN)
            poller.register(self._pidfd, select.POLLIN)
            timeout_ms = max(1, int(self.poll_interval * 1000))
            while not (stop_event.is_set() or self._halt.is_set()):
                ready, finished = False, False
                for fd, events in poller.poll(timeout_ms):
                    if fd == self.listener_fd:
                        ready = ready or bool(events & select.POLLIN)
                        # POLLHUP: no task uses the filter any more.
                        hangup = select.POLLHUP | select.POLLERR | select.POLLNVAL
                        finished = finished or bool(events & hangup)
                    else:
                        finished = True  # pidfd readable: the guest has exited
                if ready:
                    self._serve_one()
                if finished:
                    self.log.info("guest %d: exited, trap handler stops", self.guest_pid)
                    return
        finally:
            self._idle.set()

    def close(self) -> None:
        """Stop serving (waits for the loop to notice) and close the listener and pidfd."""
        if self._closed:
            return
        self._halt.set()
        # Closing an fd another thread polls could hand its number to a new file.
        if not self._idle.wait(10 * self.poll_interval + 1.0):
            raise RuntimeError("trap handler did not stop; not closing its fds")
        self._closed = True
        os.close(self.listener_fd)
        if self._pidfd is not None:
            os.close(self._pidfd)

    def __enter__(self) -> GuestTrapHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve_one(self) -> None:
        notif = _Notif()  # the kernel insists on a zeroed buffer
        try:
            _ioctl(self.listener_fd, _NOTIF_RECV, notif)
        except OSError as e:
            # ENOENT: the trapped call went away (signal, death) between poll and recv.
            if e.errno not in (errno.ENOENT, errno.EINTR):
                self.log.warning("guest %d: receiving a trap failed: %s", self.guest_pid, e)
            return
        name = self._names.get(notif.data.nr, f"syscall {notif.data.nr}")
        try:
            verdict = self._decide(notif, name)
        except _Vanished:
            self.log.debug("guest %d: pid %d vanished during %s", self.guest_pid, notif.pid, name)
            return
        except Exception:
            # A bug here must neither kill the monitor thread nor let the call through.
            self.log.exception("guest %d: deciding %s failed; refusing", self.guest_pid, name)
            verdict = _Verdict(errno.EPERM, "internal error")
        with self._lock:
            # Counted before answering: the guest may report back before respond returns.
            counts = self._counts.setdefault(name, {"handled": 0, "refused": 0})
            counts["handled"] += 1
            if verdict.error:
                counts["refused"] += 1
        if verdict.error:
            self.log.warning(
                "guest %d: refused %s from pid %d: %s (%s)",
                self.guest_pid, name, notif.pid, verdict.subject, errno.errorcode[verdict.error],
            )  # fmt: skip
        self._respond(notif.id, verdict.error)

    def _respond(self, notif_id: int, error: int) -> None:
        resp = _NotifResp()
        resp.id = notif_id
        if error:
            resp.error = -error  # the kernel wants a negative errno
        else:
            resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE  # val and error must stay 0
        try:
            _ioctl(self.listener_fd, _NOTIF_SEND, resp)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the task died or was interrupted
                self.log.warning("guest %d: answering a trap failed: %s", self.guest_pid, e)

    def _id_valid(self, notif_id: int) -> bool:
        try:
            _ioctl(self.listener_fd, _NOTIF_ID_VALID, ctypes.c_uint64(notif_id))
        except OSError:
            return False
        return True

    def _decide(self, notif: _Notif, name: str) -> _Verdict:
        if notif.pid == 0:
            # The trapped task is not visible in our pid namespace: nothing to inspect.
            error = errno.EACCES if name in OPEN_SYSCALLS else errno.EPERM
            return _Verdict(error, "caller outside the monitor's pid namespace")
        if name in OPEN_SYSCALLS:
            verdict = self._decide_open(notif, name)
        elif name in SIGNAL_SYSCALLS:
            verdict = self._decide_signal(notif, name)
        else:
            verdict = _Verdict(errno.EPERM, "unexpected trap")
        # Everything above read /proc/<pid>; if that pid is no longer the trapped task
        # (it died and the number was reused) the facts belong to someone else.
        if not self._id_valid(notif.id):
            raise _Vanished
        return verdict

    # -- process tree

    def _tgid(self, pid: int) -> int | None:
        return _status_field(pid, b"Tgid:")

    def _in_guest_tree(self, pid: int) -> bool:
        """pid (a process or thread id) is the guest or one of its descendants."""
        cur = self._tgid(pid)
        for _ in range(4096):
            if cur is None or cur <= 1:
                return False
            if cur == self.guest_pid:
                return True
            pp = _ppid_and_pgrp(cur)
            cur = pp[0] if pp else None
        return False

    def _group_in_tree(self, pgid: int) -> bool:
        """Every member of process group pgid is in the guest tree (and there is one)."""
        members = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pp = _ppid_and_pgrp(int(entry.name))
            if pp is None or pp[1] != pgid:
                continue
            members += 1
            if not self._in_guest_tree(int(entry.name)):
                return False
        return members > 0

    # -- signals

    def _decide_signal(self, notif: _Notif, name: str) -> _Verdict:
        args = notif.data.args
        if name == "pidfd_send_signal":
            if args[3] & ~_PIDFD_SIGNAL_THREAD_OR_GROUP:
                return _Verdict(errno.EPERM, f"pidfd flags {args[3]:#x}")
            target = self._pidfd_target(notif.pid, _s32(args[0]))
            if target is None:
                return _Verdict(errno.EPERM, f"fd {_s32(args[0])}: not a pidfd we can place")
            return self._target_verdict(target)
        pid = _s32(args[0])
        if name == "kill" and pid == 0:
            try:
                pgid = os.getpgid(notif.pid)
            except ProcessLookupError:
                raise _Vanished from None
            ok = self._group_in_tree(pgid)
            return _Verdict(0 if ok else errno.EPERM, f"own process group {pgid}")
        if name == "kill" and pid < -1:
            ok = self._group_in_tree(-pid)
            return _Verdict(0 if ok else errno.EPERM, f"process group {-pid}")
        if pid <= 0:  # kill(-1): everyone; others: the kernel would say EINVAL/ESRCH
            return _Verdict(errno.EPERM, f"pid {pid}")
        return self._target_verdict(pid)

    def _target_verdict(self, pid: int) -> _Verdict:
        ok = self._in_guest_tree(pid)
        return _Verdict(0 if ok else errno.EPERM, f"pid {pid}")

    def _pidfd_target(self, tid: int, fd: int) -> int | None:
        try:
            with open(f"/proc/{tid}/fdinfo/{fd}", "rb") as f:
                for line in f:
                    if line.startswith(b"Pid:"):
                        pid = int(line.split()[1])
                        return pid if pid > 0 else None
            # pidfd_send_signal also takes a /proc/<pid> directory fd.
            m = re.fullmatch(r"/proc/(\d+)", os.readlink(f"/proc/{tid}/fd/{fd}"))
        except (OSError, ValueError, IndexError):
            return None
        return int(m[1]) if m else None

    # -- opens

    def _decide_open(self, notif: _Notif, name: str) -> _Verdict:
        tid = notif.pid
        args = notif.data.args
        if name in ("open", "creat"):
            dirfd, path_addr = _AT_FDCWD, args[0]
        else:
            dirfd, path_addr = _s32(args[0]), args[1]
        try:
            memfd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            raise _Vanished from None
        except OSError as e:
            return _Verdict(errno.EACCES, f"cannot read the caller's memory: {e}")
        try:
            # The mem fd is bound to the task it was opened for; check that task is still
            # the one that trapped before trusting what we read through it.
            if not self._id_valid(notif.id):
                raise _Vanished
            raw = self._pread(memfd, PATH_MAX, path_addr)
            in_root = False
            if name == "openat2" and args[3] >= 24:  # struct open_how {flags, mode, resolve}
                how = self._pread(memfd, 24, args[2])
                if how is None or len(how) < 24:
                    return _Verdict(errno.EFAULT, "unreadable open_how")
                in_root = bool(int.from_bytes(how[16:24], "little") & _RESOLVE_IN_ROOT)
        finally:
            os.close(memfd)
        # Answer what the kernel would answer for a path it cannot read either.
        if raw is None:
            return _Verdict(errno.EFAULT, f"unreadable path at {path_addr:#x}")
        end = raw.find(b"\0")
        if end < 0:
            error = errno.ENAMETOOLONG if len(raw) >= PATH_MAX else errno.EFAULT
            return _Verdict(error, f"unterminated path at {path_addr:#x}")
        path = raw[:end]

        if path.startswith(b"/") and not in_root:
            full = path
        else:
            link = f"/proc/{tid}/cwd" if dirfd == _AT_FDCWD else f"/proc/{tid}/fd/{dirfd}"
            try:
                base = os.readlink(link.encode())
            except FileNotFoundError:
                return _Verdict(errno.EBADF, f"dirfd {dirfd} for {path!r}")
            except ProcessLookupError:
                raise _Vanished from None
            if not base.startswith(b"/"):  # a pipe, socket, anon inode...
                return _Verdict(errno.ENOTDIR, f"dirfd {dirfd} ({base!r}) for {path!r}")
            full = _join_in_root(base, path) if in_root else base + b"/" + path
        reason = self._refusal_reason(full, tid)
        if reason:
            return _Verdict(errno.EACCES, f"{full!r}: {reason}")
        return _Verdict(0, repr(full))

    @staticmethod
    def _pread(fd: int, size: int, addr: int) -> bytes | None:
        try:
            # A read running into an unmapped page stops there: partial data, not EIO.
            return os.pread(fd, size, addr)
        except (OSError, OverflowError):  # EIO: unmapped; Overflow: kernel-half address
            return None

    def _refusal_reason(self, path: bytes, tid: int) -> str | None:
        lexical = self._own_proc_names(_normalize(path), tid)
        # The lexical form catches '..' games, the resolved form catches symlinks; the
        # kernel follows the latter, the former costs nothing to check as well.
        candidates = [lexical]
        with contextlib.suppress(OSError):
            candidates.append(os.path.realpath(lexical))
        for candidate in candidates:
            reason = self._proc_reason(candidate) or self._sys_reason(candidate)
            if reason:
                return reason
        try:
            st = os.stat(candidates[-1])
        except (OSError, ValueError):
            return None  # does not exist (yet): O_CREAT of a new file, or ENOENT to come
        if stat.S_ISCHR(st.st_mode):
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if dev in _RAW_MEMORY_DEVICES:
                return f"raw memory device {dev[0]}:{dev[1]}"
            if dev[0] == _MSR_MAJOR:
                return "CPU model-specific registers"
        return None

    def _own_proc_names(self, path: bytes, tid: int) -> bytes:
        """/proc/self and /proc/thread-self as the caller sees them, not as we would."""
        for mount in self._proc_mounts:
            comps = _under(path, mount)
            if not comps or comps[0] not in (b"self", b"thread-self"):
                continue
            tgid = self._tgid(tid)
            if tgid is None:
                raise _Vanished
            own = [str(tgid).encode()]
            if comps[0] == b"thread-self":
                own += [b"task", str(tid).encode()]
            return mount.rstrip(b"/") + b"/" + b"/".join(own + comps[1:])
        return path

    def _proc_reason(self, path: bytes) -> str | None:
        for mount in self._proc_mounts:
            comps = _under(path, mount)
            if not comps:
                continue
            if comps[0] in _PROC_PHYSICAL:
                return "physical memory"
            if not comps[0].isdigit():
                continue
            rest = set(comps[1:])
            if rest & _PROC_MEMORY:
                return "process memory"
            if rest & _PROC_FOREIGN and not self._in_guest_tree(int(comps[0])):
                return "another process's files or memory"
        return None

    def _sys_reason(self, path: bytes) -> str | None:
        for mount in self._sys_mounts:
            comps = _under(path, mount)
            if (
                comps
                and comps[0] == b"devices"
                and any(c.startswith(b"pci") for c in comps)
                and _SYSFS_PCI_RAW.fullmatch(comps[-1])
            ):
                return "PCI device memory or config space"
        return None
