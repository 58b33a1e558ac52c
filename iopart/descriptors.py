"""The partition descriptor table: the ultravisor writes it, everyone else reads it.

The table lives in a sealed memfd. `DescriptorTable` (ultravisor) maps it writable
and publishes a slot per partition index whenever the resource database changes;
the memfd is then sealed with F_SEAL_FUTURE_WRITE, so any other process that gets
the fd (`DescriptorReader`: monitors, I/O partitions) can only map it read-only.
Each slot is a seqlock, and the partition's memory is an `iop_xlate_table`
inside the slot: readers translate client addresses against the live table and
see a new generation as soon as memory is reassigned. See native/iop_dtab.h.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Any

from iopart._native import check, ffi, lib
from iopart.channels.xlate import Region
from iopart.errors import IopartError
from iopart.pool import Extent
from iopart.resources import MAX_PARTITIONS, PartitionRecord

READ_WRITE = int(lib.IOP_ACCESS_READ | lib.IOP_ACCESS_WRITE)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
F_SEAL_FUTURE_WRITE = 0x0010


class DescriptorError(IopartError):
    kind = "descriptor"


@dataclass(frozen=True)
class PartitionDescriptor:
    """One slot as read, consistently, by a reader."""

    index: int
    seq: int
    name: str
    kind: str
    state: str
    cpu: float
    memory: int
    generation: int
    regions: tuple[Region, ...]


def regions_for(extents: list[Extent], area_offset: int) -> list[Region]:
    """A partition's page-map extents laid out at PRPA 0, 1, ... in order."""
    out, prpa = [], 0
    for e in extents:
        out.append(Region(prpa, e.length, area_offset + e.offset, READ_WRITE))
        prpa += e.length
    return out


class DescriptorTable:
    """The writable table, owned by the ultravisor."""

    def __init__(self, pool_len: int, nslots: int = MAX_PARTITIONS) -> None:
        self.nslots = nslots
        self.size = int(lib.iop_dtab_size(nslots))
        self.fd = os.memfd_create("iopart-descriptors", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)
            # every later mapping of this fd, in any process, is read-only
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS | F_SEAL_FUTURE_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._base: Any = ffi.from_buffer("char[]", self.mm)
        check(int(lib.iop_dtab_init(self._base, nslots, pool_len)), "descriptor table init")
        self._published: dict[int, tuple[object, ...]] = {}

    def publish(self, p: PartitionRecord, regions: list[Region]) -> bool:
        """Publish partition `p`; returns False when the slot already says this."""
        key = (p.name, p.kind, p.state, p.cpu, p.memory, tuple(regions))
        if self._published.get(p.index) == key:
            return False
        arr = ffi.new("struct iop_region[]", max(len(regions), 1))
        for i, r in enumerate(regions):
            arr[i].prpa, arr[i].len, arr[i].pool_off, arr[i].access = (
                r.prpa, r.len, r.pool_off, r.access
            )
        rc = lib.iop_dtab_publish(
            self._base, p.index, p.name.encode(), p.kind.encode(), p.state.encode(),
            round(p.cpu * 1000), p.memory, arr, len(regions),
        )
        check(int(rc), f"publish descriptor of {p.name!r}")
        self._published[p.index] = key
        return True

    def clear(self, index: int) -> None:
        if self._published.pop(index, None) is not None:
            rc = lib.iop_dtab_publish(self._base, index, ffi.NULL, ffi.NULL, ffi.NULL, 0, 0,
                                      ffi.NULL, 0)
            check(int(rc), f"clear descriptor {index}")

    def sync(self, partitions: dict[str, PartitionRecord],
             regions: dict[str, list[Region]]) -> int:
        """Make the table match the database; returns how many slots changed."""
        live = {p.index for p in partitions.values()}
        gone = [i for i in self._published if i not in live]
        for i in gone:
            self.clear(i)
        changed = sum(self.publish(p, regions[n]) for n, p in partitions.items())
        return changed + len(gone)

    @property
    def publishes(self) -> int:
        return int(ffi.cast("struct iop_dtab_hdr *", self._base).publishes)

    def close(self) -> None:
        del self._base
        self.mm.close()
        os.close(self.fd)


class DescriptorReader:
    """A read-only mapping of the table, from its fd (which it takes over)."""

    def __init__(self, fd: int) -> None:
        try:
            size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._base: Any = ffi.from_buffer("char[]", self.mm)
        n = int(lib.iop_dtab_check(self._base, size))
        if n < 0:
            raise DescriptorError(
                f"not a descriptor table (rc {n}): bad magic, version or size",
                errno=errno.EPROTO,
            )
        self.nslots = n
        self._slots: Any = ffi.cast(
            "struct iop_pdesc *", self._base + ffi.sizeof("struct iop_dtab_hdr")
        )

    def read(self, index: int) -> PartitionDescriptor | None:
        """The partition in slot `index`, or None when the slot is free."""
        out = ffi.new("struct iop_pdesc *")
        seq = int(lib.iop_dtab_read(self._base, index, out, 1000))
        check(seq, f"read descriptor {index}")
        if out.status != lib.IOP_PDESC_LIVE:
            return None
        m = out.mem
        regions = tuple(
            Region(int(r.prpa), int(r.len), int(r.pool_off), int(r.access))
            for r in m.regions[0 : m.nregions]
        )
        return PartitionDescriptor(
            index=int(out.index), seq=seq, name=ffi.string(out.name).decode(),
            kind=ffi.string(out.kind).decode(), state=ffi.string(out.state).decode(),
            cpu=int(out.cpu_milli) / 1000, memory=int(out.memory),
            generation=int(m.generation), regions=regions,
        )

    def all(self) -> list[PartitionDescriptor]:
        found = (self.read(i) for i in range(self.nslots))
        return [d for d in found if d is not None]

    def translate(self, index: int, prpa: int, length: int,
                  access: int = READ_WRITE) -> tuple[list[tuple[int, int]], int]:
        """Translate against the live slot: [(pool_off, len)...] and the generation."""
        if not 0 <= index < self.nslots:
            raise DescriptorError(f"no descriptor slot {index}", errno=errno.ERANGE)
        sg = ffi.new("struct iop_sg[]", 16)
        gen = ffi.new("uint32_t *")
        n = check(int(lib.iop_xlate(ffi.addressof(self._slots[index], "mem"), prpa, length,
                                    access, sg, 16, gen)), "translate")
        return [(int(sg[i].pool_off), int(sg[i].len)) for i in range(n)], int(gen[0])

    def xlate_table(self, index: int) -> Any:
        """The live `struct iop_xlate_table *` of slot `index` (read-only memory)."""
        if not 0 <= index < self.nslots:
            raise DescriptorError(f"no descriptor slot {index}", errno=errno.ERANGE)
        return ffi.addressof(self._slots[index], "mem")

    def valid(self, index: int, generation: int) -> bool:
        """Is a translation made under `generation` still good?"""
        return bool(lib.iop_xlate_valid(ffi.addressof(self._slots[index], "mem"), generation))

    def close(self) -> None:
        del self._slots, self._base
        self.mm.close()
