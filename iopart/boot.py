"""The boot partition: starts the system partitions and keeps them running.

It starts the ultravisor, then the command partition, as separate processes, and
watches each with a pidfd. A partition that dies is started again (claim 8), with
a back-off when it keeps failing. Boot also holds its own command channel to the
ultravisor, through which it requests the resources of the system partitions
themselves (their records, CPU and state) and records their health, retrying
while the database is held by another transaction, until the command partition
is there to take over (claim 55). Its view is written to `boot.json`.

`iopart up` runs this detached; `iopart down` sends it SIGTERM, and it stops the
command partition, then the ultravisor.

    python -m iopart.boot --state-dir DIR [--config FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from iopart.config import load as load_config
from iopart.errors import IopartError
from iopart.ioarea import IO_PARTITIONS
from iopart.statefile import write_json_atomic
from iopart.uvlink import UltravisorError, UltravisorLink

log = logging.getLogger("iopart.boot")
SYSTEM_CPU = 0.01  # CPU share recorded for each system partition
START_ORDER = ("ultravisor", "command", *IO_PARTITIONS)
__all__ = ["IO_PARTITIONS", "START_ORDER", "Boot", "main"]
STOP_GRACE_S = 10.0
QUICK_EXIT_S = 1.0  # a child that dies sooner than this after its start is crash-looping


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    restarts: int = 0
    started: float = 0.0
    started_at: float = 0.0
    quick_failures: int = 0
    last_exit: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0


class Boot:
    def __init__(self, state_dir: Path, config: Path | None) -> None:
        self.state_dir = state_dir.resolve()
        self.log_dir = self.state_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        extra = ["--config", str(config.resolve())] if config else []
        base = [sys.executable, "-m"]
        self.children = {
            "ultravisor": Child("ultravisor", [*base, "iopart.ultravisor", "--state-dir",
                                               str(self.state_dir), *extra]),
            "command": Child("command", [*base, "iopart.command", "--state-dir",
                                         str(self.state_dir), *extra]),
        }
        for name in IO_PARTITIONS:
            self.children[name] = Child(name, [*base, "iopart.iopartition", "--state-dir",
                                               str(self.state_dir), "--name", name, *extra])
        self.sel = selectors.DefaultSelector()
        self.running = True
        self.link: UltravisorLink | None = None
        self.wanted: dict[str, str] = {}  # system partition -> state still to record
        self._logs: list[IO[bytes]] = []

    # -- children
    def start(self, c: Child) -> None:
        out = open(self.log_dir / f"{c.name}.log", "ab")  # noqa: SIM115 - kept for the child
        self._logs.append(out)
        c.proc = subprocess.Popen(c.argv, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, cwd=self.state_dir)
        c.pidfd = os.pidfd_open(c.proc.pid)
        c.started = time.monotonic()
        c.started_at = time.time()
        self.sel.register(c.pidfd, selectors.EVENT_READ, c)
        log.info("started %s (pid %d)", c.name, c.proc.pid)
        if c.name == "ultravisor":
            self.wait_for(self.state_dir / "ultravisor.sock", c)
            self.drop_link()
        self.wanted[c.name] = "running"
        self.write_state()

    def wait_for(self, path: Path, c: Child, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            if c.proc is not None and c.proc.poll() is not None:
                return
            time.sleep(0.02)

    def exited(self, c: Child) -> None:
        self.sel.unregister(c.pidfd)
        os.close(c.pidfd)
        assert c.proc is not None
        c.last_exit = c.proc.wait()
        log.warning("%s (pid %d) exited with %s", c.name, c.proc.pid, c.last_exit)
        c.proc, c.pidfd = None, -1
        if not self.running:
            return
        # a SIGKILL comes from outside (fault injection, fencing by the standby), not
        # from a crash loop: it restarts at once
        killed = c.last_exit == -signal.SIGKILL
        quick = time.monotonic() - c.started < QUICK_EXIT_S and not killed
        c.quick_failures = c.quick_failures + 1 if quick else 0
        self.wanted[c.name] = "failed"
        self.record_states()
        if c.quick_failures > 3:  # crash loop: back off, up to 5 s
            delay = min(5.0, 0.1 * 2 ** (c.quick_failures - 3))
            log.warning("%s keeps failing at start: waiting %.1f s", c.name, delay)
            time.sleep(delay)
        c.restarts += 1
        self.start(c)

    # -- resources of the system partitions, through boot's own command channel
    def drop_link(self) -> None:
        if self.link is not None:
            with contextlib.suppress(OSError):
                self.link.close()
            self.link = None

    def record_states(self) -> None:
        """Request the system partitions' records and states; retried until it works."""
        if not self.wanted:
            return
        try:
            if self.link is None or not self.link.alive():
                self.drop_link()
                self.link = UltravisorLink.connect(self.state_dir, "boot", timeout=0.5)
            parts = self.link.query("snapshot")["snapshot"]["partitions"]
            steps: list[dict[str, Any]] = []
            for name in ("boot", *START_ORDER):
                if name not in parts:
                    kind = "io" if name in IO_PARTITIONS else "system"
                    steps.append({"op": "create_partition", "name": name, "kind": kind,
                                  "cpu": SYSTEM_CPU})
                want = "running" if name == "boot" else self.wanted.get(name)
                if want and parts.get(name, {}).get("state") != want:
                    steps.append({"op": "set_state", "name": name, "state": want})
            if steps:
                self.link.transact(steps)
            self.wanted.clear()
        except UltravisorError as exc:
            log.info("system partition records not yet taken (%s); retrying", exc.message)
        except (IopartError, OSError) as exc:
            log.info("ultravisor not reachable for boot (%s); retrying", exc)
            self.drop_link()

    def write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "children": {
                c.name: {"pid": c.pid, "alive": c.proc is not None and c.proc.poll() is None,
                         "restarts": c.restarts, "last_exit": c.last_exit,
                         "started_at": c.started_at}
                for c in self.children.values()
            },
        }
        write_json_atomic(self.state_dir / "boot.json", state)

    # -- main loop
    def run(self) -> None:
        for name in START_ORDER:
            self.start(self.children[name])
        self.record_states()
        while self.running:
            for key, _ in self.sel.select(timeout=0.5):
                self.exited(key.data)
                self.write_state()
            self.record_states()
        self.stop()

    def stop(self) -> None:
        for name in reversed(START_ORDER):
            c = self.children[name]
            if c.proc is None:
                continue
            c.proc.terminate()
            try:
                c.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killed", name, STOP_GRACE_S)
                c.proc.kill()
                c.proc.wait()
            log.info("stopped %s", name)
        self.drop_link()
        for f in self._logs:
            f.close()
        (self.state_dir / "boot.json").unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="iopart-boot")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--config", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s boot %(message)s")
    load_config(args.config)  # refuse a bad config before anything starts
    boot = Boot(args.state_dir, args.config)

    def stop(*_: object) -> None:
        boot.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    boot.run()


if __name__ == "__main__":
    main()
