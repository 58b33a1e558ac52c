"""NBD servers as disk-latency peers: nbdkit's file plugin and qemu-storage-daemon.

This module owns starting one NBD server over a Unix socket in a private directory, waiting
(bounded) until it accepts connections, handing out its NBD URI for fio's ``nbd`` engine,
and stopping it: its whole process group is signalled, the socket and directory removed.
Both servers are context managers, and a failed start leaves nothing running.

Each server is started as ``setpriv --pdeathsig KILL [taskset -c CPU] SERVER ...``: setpriv
and taskset exec the server, so it keeps their PID, dies with the Python process that
started it (even on SIGKILL of that process; note that the parent *thread* that started it
counts, so start servers from a thread that outlives them), and runs pinned when ``cpu`` is
given.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

NBDKIT = "nbdkit"
QSD = "qemu-storage-daemon"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1
_NBD_MAGIC = b"NBDMAGIC"
_IHAVEOPT = b"IHAVEOPT"
_FLAGS_FIXED_NOZEROES = 0x3  # NBD_FLAG_(C_)FIXED_NEWSTYLE | NBD_FLAG_(C_)NO_ZEROES
_NBD_OPT_ABORT = 2


@functools.cache
def nbdkit_file_supports_direct() -> bool:
    """Whether this nbdkit's file plugin takes ``direct=true`` (O_DIRECT; not in 1.32)."""
    try:
        res = subprocess.run(
            [NBDKIT, "file", "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return "direct=" in res.stdout + res.stderr


class _NbdServer:
    """Start/stop machinery shared by the servers; subclasses give the argv and the URI."""

    program = ""

    def __init__(
        self, *, cpu: int | None, start_timeout_s: float, workdir: str | os.PathLike[str] | None
    ) -> None:
        if cpu is not None and cpu not in os.sched_getaffinity(0):
            raise ValueError(f"cpu {cpu} is not in this process's affinity mask")
        self.cpu = cpu
        self.start_timeout_s = start_timeout_s
        self._workdir_parent = None if workdir is None else os.fspath(workdir)
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.stderr = ""  # the server's stderr, kept after stop()

    # -- paths -------------------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        if self._dir is None:
            raise RuntimeError(f"{self.program} is not started")
        return self._dir / "nbd.sock"

    @property
    def _pidfile(self) -> Path:
        return self.socket_path.with_name("server.pid")

    @property
    def _log(self) -> Path:
        return self.socket_path.with_name("server.log")

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.program} is not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def uri(self) -> str:
        raise NotImplementedError

    def _argv(self) -> list[str]:
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------
    def _spawn(self, log_mode: str) -> list[str]:
        """Start the server process (dies with its starter, pinned if asked); its argv."""
        argv = ["setpriv", "--pdeathsig", "KILL"]
        if self.cpu is not None:
            argv += ["taskset", "-c", str(self.cpu)]
        argv += self._argv()
        with open(self._log, log_mode) as log:
            # stderr to a file, not a pipe: nobody drains a pipe while we benchmark.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return argv

    def start(self) -> None:
        """Start the server and return once it accepts connections; on failure stop it."""
        if self._proc is not None:
            raise RuntimeError(f"{self.program} is already started")
        if shutil.which(self.program) is None:
            raise RuntimeError(f"{self.program} is not installed")
        try:
            self._dir = Path(tempfile.mkdtemp(prefix="iopart-nbd-", dir=self._workdir_parent))
            if len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
                raise RuntimeError(f"socket path too long for AF_UNIX: {self.socket_path}")
            argv = self._spawn("wb")
            self._wait_ready(argv)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, argv: list[str]) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.002
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"{self.program} exited with {rc} before it was ready: {' '.join(argv)}\n"
                    f"{self._read_log()}"
                )
            # Both servers write the pidfile once they are listening; then check for real.
            if self._pidfile.exists() and self._pidfile.read_text().strip() and self._accepts():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.program} did not accept connections on {self.socket_path} within "
                    f"{self.start_timeout_s} s: {' '.join(argv)}\n{self._read_log()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _accepts(self) -> bool:
        """Connect, read the newstyle greeting, and leave politely with NBD_OPT_ABORT.

        A bare connect-and-close makes both servers log a broken pipe; this does not.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(os.fspath(self.socket_path))
                greeting = b""
                while len(greeting) < 18:
                    chunk = s.recv(18 - len(greeting))
                    if not chunk:
                        return False
                    greeting += chunk
                if greeting[:16] != _NBD_MAGIC + _IHAVEOPT:
                    raise RuntimeError(f"{self.program} sent no NBD greeting: {greeting!r}")
                flags = int.from_bytes(greeting[16:18], "big")
                s.sendall(
                    (flags & _FLAGS_FIXED_NOZEROES).to_bytes(4, "big")
                    + _IHAVEOPT
                    + _NBD_OPT_ABORT.to_bytes(4, "big")
                    + (0).to_bytes(4, "big")
                )
                with contextlib.suppress(OSError):
                    s.recv(20)  # the server's ack, if any, before it closes
            except OSError:
                return False
        return True

    def _read_log(self) -> str:
        try:
            return self._log.read_text(errors="replace").strip()
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its files. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._dir is not None:
            self.stderr = self._read_log()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> _NbdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class NbdkitFile(_NbdServer):
    """``nbdkit file FILE`` on a Unix socket.

    ``direct=True`` asks for O_DIRECT. The file plugin has ``direct=true`` only in newer
    nbdkit (not 1.32); without it the closest is ``cache=none`` (the plugin drops the pages
    it read or wrote from the page cache), used unless ``cache`` is given. ``o_direct``
    tells which one is in force and ``mode`` spells out the plugin parameters.
    """

    program = NBDKIT

    def __init__(
        self,
        filename: str | os.PathLike[str],
        *,
        direct: bool = False,
        cache: str | None = None,
        fadvise: str | None = None,
        threads: int | None = None,
        readonly: bool = False,
        cpu: int | None = None,
        start_timeout_s: float = 10.0,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(cpu=cpu, start_timeout_s=start_timeout_s, workdir=workdir)
        self.filename = os.fspath(filename)
        self.threads = threads
        self.readonly = readonly
        params: list[str] = []
        self.o_direct = direct and nbdkit_file_supports_direct()
        if self.o_direct:
            params.append("direct=true")
        if cache is None and direct and not self.o_direct:
            cache = "none"
        if cache is not None:
            params.append(f"cache={cache}")
        if fadvise is not None:
            params.append(f"fadvise={fadvise}")
        self.params = params

    @property
    def mode(self) -> str:
        return " ".join(self.params) or "default"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket_path}"

    def _argv(self) -> list[str]:
        argv = [
            NBDKIT,
            "--foreground",
            "--exit-with-parent",
            "--unix",
            os.fspath(self.socket_path),
            "--pidfile",
            os.fspath(self._pidfile),
        ]
        if self.threads is not None:
            argv += ["--threads", str(self.threads)]
        if self.readonly:
            argv.append("--readonly")
        return [*argv, "file", f"file={self.filename}", *self.params]

    def __enter__(self) -> NbdkitFile:
        self.start()
        return self


def _qopt(value: str) -> str:
    """Escape a value for QEMU's KEY=VALUE,... option syntax."""
    return value.replace(",", ",,")


class QemuStorageDaemon(_NbdServer):
    """``qemu-storage-daemon`` exporting FILE (file -> raw) as NBD export ``disk0``.

    ``direct`` sets ``cache.direct`` (O_DIRECT); ``aio`` is ``io_uring``, ``threads`` or
    ``native`` (``native`` needs ``direct=True``).
    """

    program = QSD
    export_name = "disk0"

    def __init__(
        self,
        filename: str | os.PathLike[str],
        *,
        direct: bool,
        aio: str = "io_uring",
        writable: bool = True,
        cpu: int | None = None,
        start_timeout_s: float = 10.0,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        if aio not in ("io_uring", "threads", "native"):
            raise ValueError(f"aio must be io_uring, threads or native, not {aio!r}")
        if aio == "native" and not direct:
            raise ValueError("aio=native needs direct=True")
        super().__init__(cpu=cpu, start_timeout_s=start_timeout_s, workdir=workdir)
        self.filename = os.fspath(filename)
        self.direct = direct
        self.aio = aio
        self.writable = writable

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export_name}?socket={self.socket_path}"

    def _argv(self) -> list[str]:
        direct = "on" if self.direct else "off"
        writable = "on" if self.writable else "off"
        return [
            QSD,
            "--pidfile",
            os.fspath(self._pidfile),
            "--blockdev",
            f"driver=file,node-name=file0,filename={_qopt(self.filename)},"
            f"cache.direct={direct},aio={self.aio}",
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0",
            "--nbd-server",
            f"addr.type=unix,addr.path={_qopt(os.fspath(self.socket_path))}",
            "--export",
            f"type=nbd,id=exp0,node-name=disk0,name={self.export_name},writable={writable}",
        ]

    def __enter__(self) -> QemuStorageDaemon:
        self.start()
        return self
