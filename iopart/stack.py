"""Starting and stopping the host stack: `iopart up` and `iopart down`.

`up` checks the config, then starts the boot partition detached (its own session,
logs in `<state-dir>/logs/`), records its pid in `boot.pid`, and waits until the
command partition answers and reaches the ultravisor. `down` sends boot SIGTERM
and waits for it to stop the system partitions; past the grace time it kills the
whole session.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iopart.boot import IO_PARTITIONS
from iopart.config import load as load_config
from iopart.cpu_enforcer import remove_groups
from iopart.errors import IopartError
from iopart.rpc import RpcClient, RpcError

DEFAULT_STATE_DIR = Path(".iopart")
Progress = Callable[[str, float], None]


class StackError(IopartError):
    kind = "stack"


def boot_pid(state_dir: Path) -> int | None:
    """The pid of a live boot partition of this state dir, else None."""
    try:
        pid = int((state_dir / "boot.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"iopart.boot" in cmdline else None


def _log_tail(state_dir: Path, n: int = 12) -> str:
    lines: list[str] = []
    for name in ("boot", "ultravisor", "command"):
        f = state_dir / "logs" / f"{name}.log"
        if f.exists():
            lines += [f"  {name}: {ln}" for ln in f.read_text(errors="replace").splitlines()[-n:]]
    return "\n".join(lines)


def up(state_dir: Path, config: Path | None, timeout: float = 30.0,
       progress: Progress | None = None) -> dict[str, Any]:
    report = progress or (lambda _label, _frac: None)
    load_config(config)  # a bad config is refused here, before anything starts
    state_dir = state_dir.resolve()
    pid = boot_pid(state_dir)
    if pid is not None:
        return {"state_dir": str(state_dir), "boot_pid": pid, "already_running": True}
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "iopart.boot", "--state-dir", str(state_dir)]
    if config is not None:
        argv += ["--config", str(config.resolve())]
    report("starting boot partition", 0.1)
    with open(state_dir / "logs" / "boot.log", "ab") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    (state_dir / "boot.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            (state_dir / "boot.pid").unlink(missing_ok=True)
            raise StackError(f"the boot partition exited with {proc.returncode}:\n"
                             f"{_log_tail(state_dir)}", errno=errno.ECHILD)
        try:
            with RpcClient(state_dir, timeout=5.0) as c:
                pong = c.call("ping")
            io_ready = all((state_dir / f"{n}.sock").exists() for n in IO_PARTITIONS)
            if pong["ultravisor"] and io_ready:
                break
            report("waiting for the ultravisor" if not pong["ultravisor"]
                   else "waiting for the I/O partitions", 0.7)
        except RpcError:
            report("waiting for the ultravisor and command partitions", 0.4)
        if time.monotonic() > deadline:
            down(state_dir)
            raise StackError(f"the stack did not come up in {timeout:.0f} s:\n"
                             f"{_log_tail(state_dir)}", errno=errno.ETIMEDOUT)
        time.sleep(0.1)
    report("up", 1.0)
    return {"state_dir": str(state_dir), "boot_pid": proc.pid, "command_pid": pong["pid"],
            "already_running": False}


def down(state_dir: Path, grace: float = 30.0) -> dict[str, Any]:
    state_dir = state_dir.resolve()
    pid = boot_pid(state_dir)
    if pid is None:
        (state_dir / "boot.pid").unlink(missing_ok=True)
        return {"state_dir": str(state_dir), "was_running": False}
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGTERM)
        killed = False
        if not select.select([pidfd], [], [], grace)[0]:
            os.killpg(pid, signal.SIGKILL)  # boot is its session leader: everything goes
            select.select([pidfd], [], [], 5.0)
            remove_groups(state_dir)
            killed = True
    finally:
        os.close(pidfd)
    (state_dir / "boot.pid").unlink(missing_ok=True)
    return {"state_dir": str(state_dir), "was_running": True, "boot_pid": pid, "killed": killed}
