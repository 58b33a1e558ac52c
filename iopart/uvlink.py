"""A system partition's link to the ultravisor: control socket plus command channel.

`UltravisorLink.connect(state_dir, name)` connects to `ultravisor.sock`, says who
it is, and receives its own command memory channel (SCM_RIGHTS). The control
socket stays open: when the ultravisor dies it reads EOF, which is how the link
knows to reconnect. Transactions travel on the channel only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from iopart.channels.handoff import AcceptedChannel, accept_channel
from iopart.command_channel import CommandClient
from iopart.errors import ChannelError, HandoffError, IopartError

COMMAND_SLOTS = 64


class UltravisorError(IopartError):
    """The ultravisor refused a transaction or query; `error` is its reply."""

    kind = "ultravisor"

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message", error)), errno=int(error.get("errno", 0)))
        self.error = error

    def to_dict(self) -> dict[str, object]:
        return dict(self.error)


class TxIds:
    """Transaction ids from the wall clock (ns), strictly increasing, unique across restarts."""

    def __init__(self) -> None:
        self.last = 0

    def next(self) -> int:
        self.last = max(time.time_ns(), self.last + 1)
        return self.last


class UltravisorLink:
    def __init__(self, sock: socket.socket, accepted: AcceptedChannel) -> None:
        self.sock = sock
        self.accepted = accepted
        assert accepted.memory is not None
        self.client = CommandClient(accepted.end, accepted.memory, COMMAND_SLOTS)
        self.txids = TxIds()

    @classmethod
    def connect(cls, state_dir: Path, name: str, timeout: float = 10.0) -> UltravisorLink:
        """Connect, retrying while the ultravisor starts, for up to `timeout` seconds."""
        path = str(state_dir / "ultravisor.sock")
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                sock.sendall(name.encode())
                sock.settimeout(timeout)
                accepted = accept_channel(sock)
                sock.settimeout(None)
                return cls(sock, accepted)
            except HandoffError:
                sock.close()
                raise  # the ultravisor answered, and said no
            except (OSError, IopartError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise ChannelError(
                        f"cannot reach the ultravisor at {path}: {exc}", errno=errno.ECONNREFUSED
                    ) from exc
                time.sleep(0.05)

    def alive(self) -> bool:
        """False once the ultravisor has closed its side (it died or stopped)."""
        try:
            return self.sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def fileno(self) -> int:
        return self.sock.fileno()

    def call(self, msg: dict[str, Any], timeout_ms: int = 10_000) -> dict[str, Any]:
        reply = self.client.call(msg, timeout_ms)
        if not reply.get("ok"):
            raise UltravisorError(reply.get("error", {"message": "malformed reply"}))
        return reply

    def query(self, q: str, **args: Any) -> dict[str, Any]:
        return self.call({"query": q, **args})

    def transact(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        """One whole transaction in one message."""
        return self.call({"tx": self.txids.next(), "steps": steps, "commit": True})

    def transact_stepwise(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        """One transaction over several messages: begin, a step each, commit.

        If this partition dies in between, the ultravisor rolls it back."""
        tx = self.txids.next()
        if not steps:
            raise IopartError("a transaction needs at least one step", errno=errno.EINVAL)
        self.call({"tx": tx, "begin": True, "steps": steps[:1]})
        try:
            for step in steps[1:]:
                self.call({"tx": tx, "steps": [step]})
        except UltravisorError:
            raise  # a refused step already rolled the transaction back
        except BaseException:
            with contextlib.suppress(IopartError):
                self.call({"tx": tx, "abort": True}, timeout_ms=2000)
            raise
        return self.call({"tx": tx, "commit": True})

    def descriptor_fd(self) -> int:
        """A read-only fd of the partition descriptor table."""
        return descriptor_fd(Path(self.sock.getpeername()).parent)

    def close(self) -> None:
        self.accepted.close()
        self.sock.close()


def request_fd(state_dir: Path, hello: str, timeout: float = 5.0,
               max_body: int = 65536) -> tuple[int, dict[str, Any]]:
    """Ask the ultravisor's control socket for one fd (`?pool`, `?monitor NAME`, ...).

    Returns the fd and the JSON body that came with it; a refusal (no fd) raises
    ChannelError carrying the ultravisor's reason."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(state_dir / "ultravisor.sock"))
        except OSError as exc:
            raise ChannelError(f"cannot reach the ultravisor in {state_dir}: {exc.strerror} "
                               "(is `iopart up` running?)", errno=exc.errno or 0) from exc
        sock.sendall(hello.encode())
        body, fds, _flags, _addr = socket.recv_fds(sock, max_body, 1)
    try:
        info: dict[str, Any] = json.loads(body) if body.startswith(b"{") else {}
    except ValueError:
        info = {}
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        why = info.get("error", "no answer")
        raise ChannelError(f"the ultravisor refused {hello!r}: {why}", errno=errno.EPERM)
    return fds[0], info


def fdstore(state_dir: Path, op: str, key: str, fds: list[int] | None = None,
            timeout: float = 5.0) -> list[int]:
    """The ultravisor's fd store for I/O partitions: `put` fds under key, `get` them
    back (new fds, the caller's to close), `drop` them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(state_dir / "ultravisor.sock"))
        except OSError as exc:
            raise ChannelError(f"cannot reach the ultravisor in {state_dir}: {exc.strerror}",
                               errno=exc.errno or 0) from exc
        socket.send_fds(sock, [f"?fdstore {op} {key}".encode()], fds or [])
        body, got, _flags, _addr = socket.recv_fds(sock, 4096, 8)
    try:
        info: dict[str, Any] = json.loads(body) if body.startswith(b"{") else {}
    except ValueError:
        info = {}
    if not info.get("ok"):
        for fd in got:
            os.close(fd)
        raise ChannelError(f"fd store {op} {key}: {info.get('error', 'no answer')}",
                           errno=errno.ENOENT if op == "get" else errno.EPERM)
    return got


def descriptor_fd(state_dir: Path, timeout: float = 5.0) -> int:
    """Ask the ultravisor for the descriptor table's fd (it can only be mapped read-only)."""
    return request_fd(state_dir, "?descriptors", timeout)[0]
