"""The command channel: transactions from the command partition to the ultravisor.

It is a memory channel like any other. The command partition owns a memory extent
of the pool (its PRPA space starts at 0). It splits that extent into one buffer per
ring slot: request bytes first, then room for the response. A request descriptor
carries two fragments, the JSON request (read) and the response buffer (write). The
ultravisor translates both through the client's region table before it touches a
byte, exactly as an I/O partition does.

The ultravisor handles a whole batch, makes it durable with one audit commit
(`TransactionManager.flush`), and only then writes the responses and publishes
them. That is group commit: each acknowledged transaction is on disk, and one fsync
is paid per batch rather than per transaction.

This is the control plane: Python runs per message here, by design. The I/O data
path never does.
"""

from __future__ import annotations

import errno
import json
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iopart._native import ffi, lib
from iopart.channels import ChannelEnd, Descriptor, Fragment, RegionTable
from iopart.errors import ChannelError, IopartError

OP_TX = 16
READ = int(lib.IOP_ACCESS_READ)
WRITE = int(lib.IOP_ACCESS_WRITE)
MAX_BATCH = 64


@dataclass(frozen=True)
class BufferLayout:
    """How the client's memory is split: one (request, response) pair per slot."""

    mem_size: int
    nslots: int

    @property
    def per_slot(self) -> int:
        return self.mem_size // self.nslots

    @property
    def req_cap(self) -> int:
        return self.per_slot // 4

    def req_addr(self, slot: int) -> int:
        return slot * self.per_slot

    def rsp_addr(self, slot: int) -> int:
        return slot * self.per_slot + self.req_cap

    @property
    def rsp_cap(self) -> int:
        return self.per_slot - self.req_cap


Handler = Callable[[Any], dict[str, Any]]


class CommandServer:
    """Ultravisor side: pops a batch, handles each message, flushes, responds."""

    def __init__(
        self,
        end: ChannelEnd,
        regions: RegionTable,
        pool_mm: mmap.mmap,
        handle: Handler,
        flush: Callable[[], object],
    ) -> None:
        self.end = end
        self.regions = regions
        self.pool = pool_mm
        self.handle = handle
        self.flush = flush
        self._why = ffi.new("const char **")
        self._d = ffi.new("struct iop_desc *")
        self.refused = 0
        self.served = 0

    def _read(self, prpa: int, length: int) -> bytes:
        sg, _gen = self.regions.translate(prpa, length, READ)
        return b"".join(self.pool[off : off + n] for off, n in sg)

    def _write(self, prpa: int, data: bytes) -> None:
        sg, _gen = self.regions.translate(prpa, len(data), WRITE)
        pos = 0
        for off, n in sg:
            self.pool[off : off + n] = data[pos : pos + n]
            pos += n

    def _message(self, d: Any) -> tuple[Any, tuple[int, int] | None]:
        """(decoded message or an error reply, response fragment) of one descriptor."""
        rc = int(lib.iop_desc_check(self.end.handle, d, self._why))
        if rc < 0:
            return IopartError(ffi.string(self._why[0]).decode(), errno=-rc), None
        if d.opcode != OP_TX or d.nfrags != 2:
            return IopartError(
                "a command needs opcode TX and two fragments", errno=errno.EINVAL
            ), None
        req, rsp = d.frags[0], d.frags[1]
        if req.access != READ or rsp.access != WRITE:
            return IopartError(
                "fragments must be (request: read, response: write)", errno=errno.EINVAL
            ), None
        out = (int(rsp.addr), int(rsp.len))
        try:
            body = self._read(int(req.addr), int(req.len))
            return json.loads(body), out
        except IopartError as exc:
            return exc, None
        except ValueError as exc:
            return IopartError(f"request is not JSON: {exc}", errno=errno.EBADMSG), out

    def serve_batch(self) -> int:
        """Handle what is in the ring now; returns how many descriptors were served."""
        work: list[tuple[int, dict[str, Any] | None, tuple[int, int] | None, int]] = []
        while len(work) < MAX_BATCH and lib.iop_chan_tx_free(self.end.handle) > len(work):
            rc = int(lib.iop_chan_pop(self.end.handle, self._d))
            if rc == -errno.EAGAIN:
                break
            if rc < 0:
                raise ChannelError(f"command channel broken: {self.end.last_error()}", errno=-rc)
            msg, out = self._message(self._d)
            status = 0
            if isinstance(msg, IopartError):
                self.refused += 1
                reply: dict[str, Any] | None = {"ok": False, "error": msg.to_dict()}
                status = -msg.errno if out is None else 0
            else:
                try:
                    reply = {"ok": True, **self.handle(msg)}
                except IopartError as exc:
                    reply = {"ok": False, "error": exc.to_dict()}
            work.append((int(self._d.id), reply, out, status))
        if not work:
            return 0
        self.flush()  # durable before any of the batch is acknowledged
        for rid, reply, out, status in work:
            length = 0
            if out is not None and reply is not None:
                data = json.dumps(reply).encode()
                if len(data) > out[1]:
                    status = -errno.EMSGSIZE
                else:
                    try:
                        self._write(out[0], data)
                        length = len(data)
                    except IopartError as exc:
                        status = -(exc.errno or errno.EFAULT)
            self.end.push(Descriptor(id=rid, opcode=OP_TX, status=status, len=length))
        self.end.publish()
        self.served += len(work)
        return len(work)

    def serve(self, stop: Callable[[], bool], timeout_ms: int = 200) -> None:
        while not stop():
            if self.serve_batch() == 0:
                self.end.wait(timeout_ms)


class CommandClient:
    """Command-partition side: pipelined requests over the channel."""

    def __init__(self, end: ChannelEnd, mem: mmap.mmap, nslots: int) -> None:
        self.end = end
        self.mem = mem
        self.layout = BufferLayout(len(mem), nslots)
        self.next_id = 1
        self.inflight: dict[int, int] = {}  # request id -> buffer slot
        self.free_slots = list(range(nslots - 1, -1, -1))

    def send(self, msg: dict[str, Any]) -> int:
        """Queue one request (not yet published); returns its id."""
        if not self.free_slots:
            raise ChannelError("command channel full: collect replies first", errno=errno.EAGAIN)
        body = json.dumps(msg).encode()
        lay = self.layout
        if len(body) > lay.req_cap:
            raise ChannelError(
                f"request of {len(body)} bytes over the {lay.req_cap} byte limit",
                errno=errno.EMSGSIZE,
            )
        slot = self.free_slots.pop()
        self.mem[lay.req_addr(slot) : lay.req_addr(slot) + len(body)] = body
        rid = self.next_id
        self.next_id += 1
        d = Descriptor(
            id=rid,
            opcode=OP_TX,
            frags=(
                Fragment(lay.req_addr(slot), len(body), READ),
                Fragment(lay.rsp_addr(slot), lay.rsp_cap, WRITE),
            ),
        )
        if not self.end.push(d):
            self.free_slots.append(slot)
            raise ChannelError("command ring full", errno=errno.EAGAIN)
        self.inflight[rid] = slot
        return rid

    def receive(self, timeout_ms: int = 5000) -> tuple[int, dict[str, Any]]:
        """Next reply: (request id, reply object)."""
        while True:
            d = self.end.pop()
            if d is not None:
                break
            if not self.end.wait(timeout_ms):
                raise ChannelError("no reply from the ultravisor", errno=errno.ETIMEDOUT)
        slot = self.inflight.pop(d.id, None)
        if slot is None:
            raise ChannelError(f"reply to unknown request {d.id}", errno=errno.EPROTO)
        self.free_slots.append(slot)
        if d.status < 0:
            return d.id, {
                "ok": False,
                "error": {
                    "kind": "channel",
                    "errno": -d.status,
                    "message": f"refused by the server ({errno.errorcode.get(-d.status)})",
                },
            }
        start = self.layout.rsp_addr(slot)
        reply: dict[str, Any] = json.loads(self.mem[start : start + d.len])
        return d.id, reply

    def call(self, msg: dict[str, Any], timeout_ms: int = 5000) -> dict[str, Any]:
        rid = self.send(msg)
        self.end.publish()
        while True:
            got, reply = self.receive(timeout_ms)
            if got == rid:
                return reply
