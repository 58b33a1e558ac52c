"""Channel, its two ends, descriptors and doorbells.

`Channel` owns the pool extent and the two eventfds of one channel. A
`ChannelEnd` is one side's attachment (client or server) to a mapping of it, in
this process or another one (see handoff). Per-message methods here are for tests
and tools; the data path runs in native loops.
"""

from __future__ import annotations

import enum
import mmap
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from iopart._native import check, ffi, lib
from iopart.errors import BadHeaderError, ChannelBrokenError, ConfigError, NativeError
from iopart.pool import ChannelMemory, Extent

#: type UUID of the generic (null/echo) channel; device channels get their own
NULL_CHANNEL_TYPE = uuid.UUID("6f2c1d0e-4b7a-4e51-9a0c-10a0c0de0001")

HEADER_SIZE = int(lib.IOP_CHAN_HDR_SIZE)
MAX_FRAGS = int(lib.IOP_MAX_FRAGS)


class Role(enum.IntEnum):
    CLIENT = int(lib.IOP_ROLE_CLIENT)
    SERVER = int(lib.IOP_ROLE_SERVER)


@dataclass(frozen=True)
class ChannelGeometry:
    """Ring size and slot size. Both powers of two; checked by the native layer."""

    nslots: int = 256
    slot_size: int = 128

    def size(self) -> int:
        n = int(lib.iop_chan_size(self.nslots, self.slot_size))
        if n == 0:
            raise ConfigError(
                f"bad channel geometry nslots={self.nslots} slot_size={self.slot_size}: "
                f"nslots must be a power of two in [{lib.IOP_RING_MIN}, {lib.IOP_RING_MAX}], "
                f"slot_size a power of two in [{lib.IOP_SLOT_MIN}, {lib.IOP_SLOT_MAX}]"
            )
        return n

    @property
    def max_frags(self) -> int:
        return min(
            (self.slot_size - int(lib.IOP_DESC_HDR_SIZE)) // int(lib.IOP_FRAG_SIZE), MAX_FRAGS
        )


@dataclass(frozen=True)
class Fragment:
    addr: int
    len: int
    access: int = int(lib.IOP_ACCESS_READ)


@dataclass(frozen=True)
class Descriptor:
    id: int
    opcode: int = int(lib.IOP_OP_NULL)
    flags: int = 0
    status: int = 0
    len: int = 0
    offset: int = 0
    frags: tuple[Fragment, ...] = field(default_factory=tuple)

    def to_c(self, out: Any) -> None:
        out.id = self.id
        out.opcode = self.opcode
        out.flags = self.flags
        out.status = self.status
        out.len = self.len
        out.offset = self.offset
        out.nfrags = len(self.frags)
        for i, f in enumerate(self.frags):
            out.frags[i].addr = f.addr
            out.frags[i].len = f.len
            out.frags[i].access = f.access

    @classmethod
    def from_c(cls, d: Any) -> Descriptor:
        n = min(int(d.nfrags), MAX_FRAGS)
        frags = tuple(
            Fragment(int(d.frags[i].addr), int(d.frags[i].len), int(d.frags[i].access))
            for i in range(n)
        )
        return cls(
            id=int(d.id),
            opcode=int(d.opcode),
            flags=int(d.flags),
            status=int(d.status),
            len=int(d.len),
            offset=int(d.offset),
            frags=frags,
        )


@dataclass(frozen=True)
class Counters:
    produced: int
    consumed: int
    refused: int
    bad_desc: int
    bad_index: int
    kicks_sent: int
    kicks_suppressed: int
    sleeps: int


class Doorbells:
    """The two eventfds of a channel: `req` wakes the server, `rsp` wakes the client."""

    def __init__(self, req: int | None = None, rsp: int | None = None) -> None:
        self.req = req if req is not None else os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.rsp = rsp if rsp is not None else os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def for_role(self, role: Role) -> tuple[int, int]:
        """(kick_fd, wait_fd) of the given end."""
        return (self.req, self.rsp) if role is Role.CLIENT else (self.rsp, self.req)

    def close(self) -> None:
        for fd in (self.req, self.rsp):
            if fd >= 0:
                os.close(fd)
        self.req = self.rsp = -1


class ChannelEnd:
    """One attached end of a channel mapping. Not thread-safe: one owner at a time."""

    def __init__(
        self, buf: mmap.mmap, offset: int, size: int, role: Role, doorbells: Doorbells | None = None
    ) -> None:
        self._buf = buf  # keeps the mapping alive as long as the handle
        self._cbuf = ffi.from_buffer("char[]", buf)
        self.role = role
        self.size = size
        handle = ffi.new("struct iop_chan **")
        why = ffi.new("const char **")
        rc = int(lib.iop_chan_attach(self._cbuf + offset, size, int(role), handle, why))
        if rc < 0:
            msg = ffi.string(why[0]).decode() if why[0] != ffi.NULL else os.strerror(-rc)
            raise BadHeaderError(f"cannot attach {role.name.lower()} end: {msg}", errno=-rc)
        self._h: Any = handle[0]
        self._tx = ffi.new("struct iop_desc *")
        self._rx = ffi.new("struct iop_desc *")
        if doorbells is not None:
            kick, wait = doorbells.for_role(role)
            lib.iop_chan_set_doorbells(self._h, kick, wait)

    @property
    def handle(self) -> Any:
        if self._h is None:
            raise ChannelBrokenError("channel end is closed")
        return self._h

    def set_spin(self, spin_ns: int) -> None:
        lib.iop_chan_set_spin(self.handle, spin_ns)

    def set_yield(self, on: bool) -> None:
        """Spin with sched_yield(): when this end shares a CPU with another busy party."""
        lib.iop_chan_set_yield(self.handle, int(on))

    def push(self, d: Descriptor) -> bool:
        """Copy a descriptor into the next slot; False when the ring is full."""
        if len(d.frags) > MAX_FRAGS:
            raise ChannelBrokenError(
                f"descriptor has {len(d.frags)} fragments, at most {MAX_FRAGS}"
            )
        ffi.memmove(self._tx, b"\0" * int(lib.IOP_DESC_HDR_SIZE), int(lib.IOP_DESC_HDR_SIZE))
        d.to_c(self._tx)
        rc = int(lib.iop_chan_push(self.handle, self._tx))
        if rc == -11:  # EAGAIN
            return False
        self._check(rc, "push")
        return True

    def publish(self) -> bool:
        """Make pushed slots visible; True if the peer's doorbell was rung."""
        return bool(lib.iop_chan_publish(self.handle))

    def pop(self) -> Descriptor | None:
        rc = int(lib.iop_chan_pop(self.handle, self._rx))
        if rc == -11:
            return None
        self._check(rc, "pop")
        return Descriptor.from_c(self._rx)

    def wait(self, timeout_ms: int = 1000) -> bool:
        """Spin, then sleep on the doorbell; True when there is something to pop."""
        rc = int(lib.iop_chan_wait(self.handle, -1, timeout_ms))
        if rc == -110:  # ETIMEDOUT
            return False
        self._check(rc, "wait")
        return rc == 0

    def counters(self) -> Counters:
        c = ffi.new("struct iop_chan_counters *")
        lib.iop_chan_counters(self.handle, c)
        return Counters(**{f: int(getattr(c, f)) for f in Counters.__dataclass_fields__})

    @property
    def broken(self) -> bool:
        return bool(lib.iop_chan_broken(self.handle))

    def last_error(self) -> str:
        return str(ffi.string(lib.iop_chan_last_error(self.handle)).decode())

    def roundtrips(self, n: int, *, timeout_ms: int = 5000) -> list[int]:
        """n native null round trips; latencies in ns."""
        lat = ffi.new("uint64_t[]", max(n, 1))
        self._check(int(lib.iop_client_roundtrips(self.handle, n, lat, timeout_ms)), "round trips")
        return list(lat)[:n]

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            if lib.iop_chan_broken(self._h):
                raise ChannelBrokenError(f"{what}: channel broken: {self.last_error()}", errno=-rc)
            raise NativeError.from_rc(rc, what)

    def close(self) -> None:
        if self._h is not None:
            lib.iop_chan_detach(self._h)
            self._h = None
            self._cbuf = None

    def __enter__(self) -> ChannelEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Channel:
    """A channel allocated in the host memory pool, with its doorbells."""

    def __init__(
        self,
        pool: ChannelMemory,
        geometry: ChannelGeometry | None = None,
        type_uuid: uuid.UUID = NULL_CHANNEL_TYPE,
        features: int = 0,
    ) -> None:
        self.pool = pool
        self.geometry = geometry or ChannelGeometry()
        need = self.geometry.size()
        self.extent: Extent = pool.allocate(need)
        self.type_uuid = type_uuid
        cbuf = ffi.from_buffer("char[]", pool.mm)
        try:
            check(
                int(
                    lib.iop_chan_format(
                        cbuf + self.extent.offset,
                        self.extent.length,
                        self.geometry.nslots,
                        self.geometry.slot_size,
                        type_uuid.bytes,
                        features,
                    )
                ),
                "format channel",
            )
        except Exception:
            pool.release(self.extent)
            raise
        del cbuf
        self.doorbells = Doorbells()

    def end(self, role: Role, *, doorbells: bool = True) -> ChannelEnd:
        """Attach an end in this process, through the pool's own mapping."""
        return ChannelEnd(
            self.pool.mm,
            self.extent.offset,
            self.extent.length,
            role,
            self.doorbells if doorbells else None,
        )

    def close(self) -> None:
        self.doorbells.close()
        self.pool.release(self.extent)
