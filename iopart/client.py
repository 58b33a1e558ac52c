"""The guest-side API: a partition's own memory and its disk endpoints.

Guest code running under a monitor stub calls `open_disk()` to get the disk
endpoint the monitor attached, and reads, writes and flushes from its own memory
(PRPA buffers), synchronously or in batches for queue depth. `run_job` drives a
whole load in native code (benchmarks, verifying load).

    from iopart import client
    disk = client.open_disk()
    disk.write(0, b"x" * 4096)
    assert disk.read(0, 4096) == b"x" * 4096
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from iopart._native import check, ffi, lib
from iopart.channels.channel import ChannelEnd, Descriptor, Fragment, Role
from iopart.channels.xlate import Region
from iopart.errors import ChannelError, IopartError

OP_READ = int(lib.IOP_OP_READ)
OP_WRITE = int(lib.IOP_OP_WRITE)
OP_FLUSH = int(lib.IOP_OP_FLUSH)
OP_NET_TX = int(lib.IOP_OP_NET_TX)
OP_NET_RX = int(lib.IOP_OP_NET_RX)
ACCESS_READ = int(lib.IOP_ACCESS_READ)
ACCESS_WRITE = int(lib.IOP_ACCESS_WRITE)
PAGE = 4096


class IoError(IopartError):
    """The I/O partition completed a request with an error status."""

    kind = "io"


@dataclass(frozen=True)
class Buffer:
    """A range of the partition's own memory: PRPA address and this process's view."""

    prpa: int
    len: int
    view: memoryview


class GuestMemory:
    """The partition's extents mapped at base + PRPA; a bump allocator for buffers."""

    def __init__(self, base: Any, span: int, regions: Sequence[Region]) -> None:
        self.base = base
        self.span = span
        self.regions = tuple(regions)
        self.view = memoryview(ffi.buffer(base, span))
        self._next = 0

    @classmethod
    def map(cls, pool_fd: int, regions: Sequence[Region]) -> GuestMemory:
        arr = ffi.new("struct iop_region[]", max(len(regions), 1))
        for i, r in enumerate(regions):
            arr[i].prpa, arr[i].len, arr[i].pool_off, arr[i].access = (
                r.prpa, r.len, r.pool_off, r.access)
        span = ffi.new("uint64_t *")
        base = lib.iop_guest_map(pool_fd, arr, len(regions), span)
        if base == ffi.NULL:
            err = ffi.errno
            raise IopartError(f"cannot map partition memory: {os.strerror(err)}", errno=err)
        return cls(base, int(span[0]), regions)

    @property
    def size(self) -> int:
        return sum(r.len for r in self.regions)

    def alloc(self, nbytes: int, align: int = PAGE) -> Buffer:
        """A buffer inside the partition's memory (never freed; reset() starts over)."""
        start = -(-self._next // align) * align
        for r in self.regions:
            lo = max(start, r.prpa)
            lo = -(-lo // align) * align
            if lo + nbytes <= r.prpa + r.len:
                self._next = lo + nbytes
                return Buffer(lo, nbytes, self.view[lo : lo + nbytes])
        raise IopartError(
            f"partition memory exhausted: {nbytes} bytes wanted, {self.size} in all",
            errno=errno.ENOMEM)

    def reset(self) -> None:
        self._next = 0

    def close(self) -> None:
        if self.base is not None:
            self.view.release()
            lib.iop_guest_unmap(self.base, self.span)
            self.base = None


@dataclass(frozen=True)
class Request:
    """One block request of a batch: op, byte offset in the endpoint, buffer."""

    op: int
    offset: int
    buf: Buffer | None = None


@dataclass(frozen=True)
class JobResult:
    ops: int
    reads: int
    writes: int
    errors: int
    verify_failures: int
    verified_bytes: int
    elapsed_ns: int
    first_error: int
    duplicates: int = 0
    latencies_ns: list[int] = field(repr=False, default_factory=list)
    done_ns: list[int] = field(repr=False, default_factory=list)


class DiskEndpoint:
    """A disk endpoint seen by its guest: the client end of a block channel."""

    def __init__(self, end: ChannelEnd, memory: GuestMemory, size: int, name: str = "disk",
                 read_only: bool = False) -> None:
        if end.role is not Role.CLIENT:
            raise ChannelError("a disk endpoint needs the client end of a channel")
        self.end = end
        self.memory = memory
        self.size = size
        self.name = name
        self.read_only = read_only
        self._next_id = 1 << 62  # apart from the native jobs' ids on the same channel
        self.duplicates = 0
        self._bounce: Buffer | None = None
        self._job_buf: Buffer | None = None

    # -- batches (queue depth)
    def submit(self, reqs: Sequence[Request], timeout_ms: int = 10_000) -> list[int]:
        """Push a batch, publish once, wait for every completion; statuses in order."""
        ids: dict[int, int] = {}
        pending = list(enumerate(reqs))
        status = [0] * len(reqs)
        while pending or ids:
            pushed = False
            while pending:
                i, r = pending[0]
                rid = self._next_id
                frags: tuple[Fragment, ...] = ()
                length = 0
                if r.buf is not None:
                    acc = ACCESS_WRITE if r.op == OP_READ else ACCESS_READ
                    frags = (Fragment(r.buf.prpa, r.buf.len, acc),)
                    length = r.buf.len
                if not self.end.push(Descriptor(rid, r.op, len=length, offset=r.offset,
                                                frags=frags)):
                    break
                self._next_id += 1
                ids[rid] = i
                pending.pop(0)
                pushed = True
            if pushed:
                self.end.publish()
            got = self.end.pop()
            if got is None:
                if not self.end.wait(timeout_ms):
                    raise IoError(f"{self.name}: no completion in {timeout_ms} ms",
                                  errno=errno.ETIMEDOUT)
                continue
            i = ids.pop(got.id, -1)
            if i < 0:
                # not in the shadow of our in-flight requests: delivered twice (or never
                # asked for); dropped and counted
                self.duplicates += 1
                continue
            status[i] = got.status
        return status

    def _one(self, op: int, offset: int, buf: Buffer | None) -> None:
        (st,) = self.submit([Request(op, offset, buf)])
        if st < 0:
            raise IoError(f"{self.name}: {_OPS[op]} at {offset}: {os.strerror(-st)}",
                          errno=-st)

    # -- synchronous calls
    def read_into(self, offset: int, buf: Buffer) -> None:
        self._one(OP_READ, offset, buf)

    def write_from(self, offset: int, buf: Buffer) -> None:
        self._one(OP_WRITE, offset, buf)

    def flush(self) -> None:
        self._one(OP_FLUSH, 0, None)

    def _bounce_buf(self, n: int) -> Buffer:
        if self._bounce is None or self._bounce.len < n:
            self._bounce = self.memory.alloc(max(n, 1 << 20))
        return Buffer(self._bounce.prpa, n, self._bounce.view[:n])

    def read(self, offset: int, length: int) -> bytes:
        """Any byte range: whole sectors are read and the range cut out of them."""
        lo, hi = _sectors(offset, length)
        b = self._bounce_buf(hi - lo)
        self.read_into(lo, b)
        return bytes(b.view[offset - lo : offset - lo + length])

    def write(self, offset: int, data: bytes) -> None:
        """Any byte range: partial sectors at the edges are read, patched and written."""
        lo, hi = _sectors(offset, len(data))
        b = self._bounce_buf(hi - lo)
        if (lo, hi) != (offset, offset + len(data)):
            self.read_into(lo, b)
        b.view[offset - lo : offset - lo + len(data)] = data
        self.write_from(lo, b)

    # -- native load
    def run_job(self, *, n_ops: int, block_size: int = 4096, queue_depth: int = 1,
                write_pct: int = 0, verify: bool = False, sequential: bool = False,
                span: int | None = None, seed: int = 1, versions: Any = None,
                latencies: bool = True, timeout_ms: int = 10_000,
                spin_ns: int | None = None, completion_times: bool = False) -> JobResult:
        """A whole load in native code: random (or sequential) block I/O at queue depth.

        spin_ns: how long to spin on the response ring before sleeping on the doorbell
        (None keeps the endpoint's setting). completion_times: record when each request
        completed (time.monotonic_ns clock), for stall measurements."""
        if spin_ns is not None:
            self.end.set_spin(spin_ns)
        if self._job_buf is None or self._job_buf.len < queue_depth * block_size:
            self._job_buf = self.memory.alloc(queue_depth * block_size)
        buf = self._job_buf  # one buffer for every job: jobs run one at a time
        job = ffi.new("struct iop_blk_job *")
        job.buf_prpa, job.buf = buf.prpa, self.memory.base + buf.prpa
        job.buf_len, job.span = buf.len, span or self.size
        job.n_ops, job.seed, job.block_size = n_ops, seed, block_size
        job.queue_depth, job.write_pct, job.verify = queue_depth, write_pct, int(verify)
        job.timeout_ms, job.sequential = timeout_ms, int(sequential)
        job.versions = versions if versions is not None else ffi.NULL
        lat = ffi.new("uint64_t[]", n_ops) if latencies else ffi.NULL
        done = ffi.new("uint64_t[]", n_ops) if completion_times else ffi.NULL
        job.done_ns = done
        res = ffi.new("struct iop_blk_job_result *")
        check(int(lib.iop_blk_client_run(self.end.handle, job, lat, res)), "block job")
        ops = int(res.ops)
        return JobResult(
            ops, int(res.reads), int(res.writes), int(res.errors),
            int(res.verify_failures), int(res.verified_bytes), int(res.elapsed_ns),
            int(res.first_error), int(res.duplicates),
            list(lat)[:ops] if latencies else [], list(done)[:ops] if completion_times else [])

    def new_versions(self, block_size: int = 4096) -> Any:
        """Verify state that lasts across jobs (one entry per block of the endpoint)."""
        return ffi.new("uint32_t[]", max(self.size // block_size, 1))


class NicEndpoint:
    """A guest's virtual NIC: the client end of a switch port.

    Receive buffers from the partition's memory are posted up front and reposted as
    frames arrive; `send` waits for the switch to take the frame (its completion).

    The endpoint keeps a shadow of its requests in flight (posted receive buffers,
    frames being sent): a completion of one of its ids that is not in flight, which a
    switch taking the port over may deliver a second time, is dropped and counted in
    `duplicates`. Completions of ids it never issued (descriptors pushed on `end` by
    hand) are counted in `unsolicited`; their statuses are kept, the latest few, for
    whoever pushed them."""

    _TX_IDS = 1 << 32  # transmit ids count up from here, receive ids (mod 2**32) below
    _KEEP_UNSOLICITED = 64

    def __init__(self, end: ChannelEnd, memory: GuestMemory, mac: bytes, *,
                 rx_buffers: int = 32, mtu: int = 1500, name: str = "nic",
                 tx_buffers: int = 1) -> None:
        if end.role is not Role.CLIENT:
            raise ChannelError("a NIC endpoint needs the client end of a channel")
        if tx_buffers < 1:
            raise ChannelError(f"{name}: a NIC needs at least one transmit buffer")
        self.end, self.memory, self.mac, self.mtu, self.name = end, memory, mac, mtu, name
        size = -(-(mtu + 18) // 64) * 64
        self._rx = [memory.alloc(size, align=64) for _ in range(rx_buffers)]
        self._tx = [memory.alloc(size, align=64) for _ in range(tx_buffers)]
        self._frames: list[bytes] = []
        self._posted: dict[int, int] = {}  # shadow: id -> receive buffer the switch holds
        self._rx_next = 0
        self._tx_inflight: set[int] = set()  # shadow: transmits not yet completed
        self._tx_status: dict[int, int] = {}
        self._unsolicited: list[int] = []
        self._next_id = self._TX_IDS
        self.duplicates = 0
        self.unsolicited = 0
        for i in range(rx_buffers):
            self._post(i)
        self.end.publish()

    def _post(self, i: int) -> None:
        b, rid = self._rx[i], self._rx_next
        if not self.end.push(Descriptor(rid, OP_NET_RX, len=b.len,
                                        frags=(Fragment(b.prpa, b.len, ACCESS_WRITE),))):
            raise ChannelError(f"{self.name}: no room to post a receive buffer")
        # a fresh id per posting: a late second completion of the buffer's last frame is
        # not taken for the next
        self._rx_next = (rid + 1) % self._TX_IDS
        self._posted[rid] = i

    def _take(self, timeout_ms: int) -> bool:
        got = self.end.pop()
        if got is None:
            return self.end.wait(timeout_ms)
        rid = got.id
        if got.opcode == OP_NET_RX and rid in self._posted:
            i = self._posted.pop(rid)
            if got.status == 0:
                self._frames.append(bytes(self._rx[i].view[: got.len]))
            self._post(i)
            self.end.publish()
        elif rid in self._tx_inflight:
            self._tx_inflight.discard(rid)
            self._tx_status[rid] = got.status
        elif rid < self._TX_IDS or rid < self._next_id:
            # one of ours that is not in flight: delivered twice; dropped
            self.duplicates += 1
        else:
            self.unsolicited += 1
            self._tx_status[rid] = got.status
            self._unsolicited.append(rid)
            if len(self._unsolicited) > self._KEEP_UNSOLICITED:
                self._tx_status.pop(self._unsolicited.pop(0), None)
        return True

    def send(self, frame: bytes, timeout_ms: int = 5000) -> int:
        """Hand a frame to the switch; its status (0, or -EPERM, -EMSGSIZE, ...)."""
        return self.send_many([frame], timeout_ms)[0]

    def send_many(self, frames: Sequence[bytes], timeout_ms: int = 5000) -> list[int]:
        """Hand frames to the switch in order, up to `tx_buffers` of them in flight;
        their statuses, in order, once the switch completed every one."""
        limit = self._tx[0].len
        for f in frames:
            if len(f) > limit:
                raise IoError(f"{self.name}: frame of {len(f)} bytes is over the MTU",
                              errno=errno.EMSGSIZE)
        status = [0] * len(frames)
        free = list(range(len(self._tx)))
        inflight: dict[int, tuple[int, int]] = {}  # id: (frame index, transmit buffer)
        nxt = 0
        while nxt < len(frames) or inflight:
            pushed = False
            while nxt < len(frames) and free:
                buf, frame = self._tx[free[-1]], frames[nxt]
                buf.view[: len(frame)] = frame
                rid = self._next_id
                frag = Fragment(buf.prpa, max(len(frame), 1), ACCESS_READ)
                if not self.end.push(Descriptor(rid, OP_NET_TX, len=len(frame),
                                                frags=(frag,))):
                    break
                self._next_id += 1
                self._tx_inflight.add(rid)
                inflight[rid] = (nxt, free.pop())
                nxt += 1
                pushed = True
            if pushed:
                self.end.publish()
            done = [rid for rid in inflight if rid in self._tx_status]
            for rid in done:
                i, k = inflight.pop(rid)
                status[i] = self._tx_status.pop(rid)
                free.append(k)
            if not done and not self._take(timeout_ms):
                raise IoError(f"{self.name}: send not completed in {timeout_ms} ms",
                              errno=errno.ETIMEDOUT)
        return status

    def recv(self, timeout_ms: int = 1000) -> bytes | None:
        """The next frame, or None when none came within the timeout."""
        while not self._frames:
            if not self._take(timeout_ms):
                return None
        return self._frames.pop(0)


NIC_BUF = int(lib.IOP_NIC_BUF)


class NicLoops:
    """Native NIC loops on a raw client end (no buffers posted by Python): round trips,
    echo, blast and the TAP bridge. Each loop owns its buffer area while it runs.
    `duplicates`: completions the loops dropped, their ids not in flight."""

    def __init__(self, end: ChannelEnd, memory: GuestMemory, mac: bytes, nbufs: int = 64) -> None:
        self.end, self.memory, self.mac, self.nbufs = end, memory, mac, nbufs
        self.buf = memory.alloc(nbufs * NIC_BUF)
        self._base = ffi.cast("uint8_t *", memory.base)
        self._posted = ""  # the loop whose receive buffers the switch holds
        self._dups = ffi.new("uint64_t *")
        self._blast_buf: Buffer | None = None

    @property
    def duplicates(self) -> int:
        return int(self._dups[0])

    def _posted_for(self, loop: str) -> int:
        if self._posted and self._posted != loop:
            raise IoError(f"the receive buffers are posted for {self._posted}; a NIC's "
                          f"buffers serve one kind of receiving loop", errno=errno.EBUSY)
        was, self._posted = self._posted, loop
        return int(bool(was))

    def pingpong(self, dst: bytes, frame_len: int, n: int, timeout_ms: int = 5000) -> list[int]:
        lat = ffi.new("uint64_t[]", max(n, 1))
        check(int(lib.iop_nic_pingpong(self.end.handle, self._base, self.buf.prpa, self.nbufs,
                                       self._posted_for("pingpong"), self.mac, dst,
                                       frame_len, n, lat, timeout_ms, self._dups)),
              "nic round trips")
        return list(lat)[:n]

    def echo(self, n: int, stop: Any = ffi.NULL, reply: bool = True,
             timeout_ms: int = 10_000) -> int:
        return check(int(lib.iop_nic_echo(self.end.handle, self._base, self.buf.prpa,
                                          self.nbufs, self._posted_for("echo"), self.mac,
                                          int(reply), n, stop, timeout_ms, self._dups)),
                     "nic echo")

    def blast(self, dst: bytes, frame_len: int, n: int,
              timeout_ms: int = 10_000) -> tuple[int, int]:
        """(frames accepted, ns) for n frames sent as fast as the switch takes them."""
        el = ffi.new("uint64_t *")
        if self._blast_buf is None:
            # its own buffers: those of a receiving loop may still be posted, and a frame
            # the switch delivers into one must not go out again as ours
            self._blast_buf = self.memory.alloc(self.nbufs * NIC_BUF)
        got = check(int(lib.iop_nic_blast(self.end.handle, self._base, self._blast_buf.prpa,
                                          self.nbufs, self.mac, dst, frame_len, n, el,
                                          timeout_ms, self._dups)), "nic blast")
        return got, int(el[0])

    def bridge(self, tap_fd: int, stop_fd: int, spin_ns: int = 50_000) -> list[int]:
        """Run the TAP bridge until stop_fd is readable; its four counters."""
        c = ffi.new("uint64_t[4]")
        check(int(lib.iop_nic_bridge(self.end.handle, self._base, self.buf.prpa, self.nbufs,
                                     tap_fd, stop_fd, spin_ns, c, self._dups)), "nic bridge")
        return list(c)

    # -- sequence-numbered traffic (iop_nic.h): a verifying load across failovers
    def seq_send(self, dst: bytes, first: int, n: int, *, credit: Any = ffi.NULL,
                 stop: Any = ffi.NULL, timeout_ms: int = 10_000) -> dict[str, int]:
        """Send frames first .. first+n-1 (fewer once *stop is set), each only while its
        number is below *credit (a `uint64_t *`, NULL: no limit); returns queued,
        accepted, failed, duplicates and stalls once every queued frame completed."""
        job = ffi.new("struct iop_nic_seq_tx *")
        job.first, job.n, job.credit, job.stop = first, n, credit, stop
        job.timeout_ms = timeout_ms
        rc = int(lib.iop_nic_seq_send(self.end.handle, self._base, self.buf.prpa, self.nbufs,
                                      self.mac, dst, job))
        self._dups[0] += job.duplicates
        check(rc, "nic sequence send")
        return {k: int(getattr(job, k))
                for k in ("queued", "accepted", "failed", "duplicates", "stalls")}

    def seq_recv(self, src: bytes, counts: Any, max_seq: int, stop: Any, *,
                 credit: Any = ffi.NULL, window: int = 0) -> dict[str, int]:
        """Keep every buffer posted and count each frame k from `src` in counts[k] (a
        `uint8_t[max_seq]`) until *stop; *credit (if given) follows the highest k plus
        `window`. Returns frames, bad, errors and duplicates."""
        job = ffi.new("struct iop_nic_seq_rx *")
        job.counts, job.max_seq, job.credit, job.window = counts, max_seq, credit, window
        job.stop, job.posted = stop, self._posted_for("seq_recv")
        rc = int(lib.iop_nic_seq_recv(self.end.handle, self._base, self.buf.prpa, self.nbufs,
                                      src, self.mac, job))
        self._dups[0] += job.duplicates
        check(rc, "nic sequence receive")
        return {k: int(getattr(job, k)) for k in ("frames", "bad", "errors", "duplicates")}

    def seq_check(self, frame: bytes, src: bytes) -> int | None:
        """The number of a sequence frame from `src` to this NIC, or None if it is not
        exactly one."""
        k = ffi.new("uint64_t *")
        if int(lib.iop_nic_seq_check(frame, len(frame), src, self.mac, k)):
            return None
        return int(k[0])


_OPS = {OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush"}
SECTOR = 512


def _sectors(offset: int, length: int) -> tuple[int, int]:
    if offset < 0 or length <= 0:
        raise IoError(f"bad range: offset {offset}, length {length}", errno=errno.EINVAL)
    return offset - offset % SECTOR, -(-(offset + length) // SECTOR) * SECTOR

# -- what the monitor stub attached for the guest code in this process
_memory: GuestMemory | None = None
_disks: dict[str, DiskEndpoint] = {}
_nics: dict[str, NicEndpoint] = {}


def attach(memory: GuestMemory, disks: dict[str, DiskEndpoint],
           nics: dict[str, NicEndpoint] | None = None) -> None:
    """Called by the monitor stub before guest code runs."""
    global _memory
    _memory = memory
    _disks.clear()
    _disks.update(disks)
    _nics.clear()
    _nics.update(nics or {})


def open_nic(name: str | None = None) -> NicEndpoint:
    """The NIC endpoint `name` (default: the first one) of this guest."""
    if not _nics:
        raise IopartError("this guest has no NIC endpoint (assign one: `iopart guest run "
                          "--nic nic0`)", errno=errno.ENODEV)
    if name is None:
        return _nics[sorted(_nics)[0]]
    if name not in _nics:
        raise IopartError(f"no NIC endpoint {name!r}; this guest has {', '.join(_nics)}",
                          errno=errno.ENOENT)
    return _nics[name]


def memory() -> GuestMemory:
    if _memory is None:
        raise IopartError("not running under an iopart monitor (no partition memory)",
                          errno=errno.ENODEV)
    return _memory


def open_disk(name: str | None = None) -> DiskEndpoint:
    """The disk endpoint `name` (default: the only or first one) of this guest."""
    if not _disks:
        raise IopartError("this guest has no disk endpoint (is it running under "
                          "`iopart guest run`?)", errno=errno.ENODEV)
    if name is None:
        return _disks[sorted(_disks)[0]]
    if name not in _disks:
        raise IopartError(f"no disk endpoint {name!r}; this guest has {', '.join(_disks)}",
                          errno=errno.ENOENT)
    return _disks[name]


def disks() -> list[str]:
    return sorted(_disks)
