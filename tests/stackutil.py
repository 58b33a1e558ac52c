"""A real host stack (boot, ultravisor, command processes) for tests, always torn down."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from iopart.cpu_enforcer import cgroup_base, remove_groups
from iopart.rpc import RpcClient, RpcError

IOPART = [sys.executable, "-m", "iopart.cli"]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IOPART, *args], capture_output=True, text=True, timeout=timeout)


class Stack:
    def __init__(self, state_dir: Path, config: Path | None = None) -> None:
        self.dir = state_dir
        self.config = config

    def sd(self) -> list[str]:
        return ["--state-dir", str(self.dir)]

    def up(self) -> dict[str, Any]:
        extra = ["--config", str(self.config)] if self.config else []
        res = cli("up", "--json", *self.sd(), *extra)
        assert res.returncode == 0, res.stdout + res.stderr
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc

    def cli_json(self, *args: str) -> Any:
        res = cli(*args, "--json", *self.sd())
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(res.stdout)

    def call(self, method: str, **params: Any) -> Any:
        with RpcClient(self.dir, timeout=20) as c:
            return c.call(method, **params)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.call("status")
        return doc

    def active_io(self) -> dict[str, Any]:
        """The report of the active I/O partition (the one serving every endpoint)."""
        for rep in self.status()["io"].values():
            if rep.get("role") == "active":
                doc: dict[str, Any] = rep
                return doc
        return {}

    def boot(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.dir / "boot.json").read_text())
        return doc

    def wait_healthy(self, timeout: float = 30.0, restarts: dict[str, int] | None = None) -> None:
        """Until both children run (with at least `restarts`) and command reaches the UV."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                b = self.boot()
                kids = b["children"]
                ok = all(c["alive"] for c in kids.values()) and all(
                    kids[n]["restarts"] >= r for n, r in (restarts or {}).items()
                )
                if ok and self.call("ping")["ultravisor"]:
                    return
                last = b
            except (OSError, ValueError, KeyError, RpcError) as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"stack not healthy in {timeout} s: {last}")

    def pids(self) -> dict[str, int]:
        kids = self.boot()["children"]
        return {n: int(c["pid"]) for n, c in kids.items()}

    def down(self) -> None:
        """Stop cleanly; whatever is left of the session is killed."""
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.dir / "boot.pid").read_text())
        cli("down", *self.sd(), timeout=60)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        time.sleep(0.05)
        remove_groups(self.dir)
        base = cgroup_base(self.dir)
        left = [p for p in Path("/sys/fs/cgroup").glob(f"*/{base}") if p.is_dir()]
        assert not left, f"cgroups left behind: {left}"


def leftover_processes(state_dir: Path) -> list[int]:
    """Processes whose command line names this state dir."""
    found = []
    needle = str(state_dir).encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (p / "cmdline").read_bytes():
                status = (p / "status").read_text()
                if "State:\tZ" not in status:
                    found.append(int(p.name))
    return found
