"""The resource database the ultravisor owns: partitions, devices, channels, assignments.

Operations are typed values parsed at the edge (`parse_op`) from the dictionaries
that travel in transactions. `ResourceDB.apply(op)` validates one operation against
the current state and applies it, returning the inverse operation so a transaction
can be rolled back in reverse order. A refused operation raises `RefusedError`
naming the field at fault and changes nothing.

Memory is the tiered page map (`iopart.pagemap`) over the partition-memory area of
the host pool: a partition's memory is the pages its index owns there. Growing,
shrinking, creating and destroying allocate and free pages, and their inverses give
back exactly the pages taken, so a rolled-back transaction leaves the map as it was.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

from iopart.errors import IopartError
from iopart.pagemap import PAGE_SIZE, PageMap, PageMapError
from iopart.pool import Extent

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
PARTITION_KINDS = ("system", "io", "guest")
PARTITION_STATES = ("defined", "running", "stopped", "failed")
DEVICE_KINDS = ("disk", "nic")
ASSIGN_MODES = ("rw", "ro", "shared")
MAX_PARTITIONS = 256  # slots of the descriptor table (iopart.descriptors)
DEFAULT_MEMORY_AREA = 1 << 30
MAX_EXTENTS = 64  # regions of a descriptor's translation table (IOP_XLATE_MAX_REGIONS)


class RefusedError(IopartError):
    """A transaction step was refused; `field` names what is wrong."""

    kind = "refused"

    def __init__(self, message: str, *, field: str = "", errno: int = errno.EINVAL) -> None:
        super().__init__(message, errno=errno)
        self.field = field

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "field": self.field}


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise RefusedError(
            f"{what} must be 1-63 chars of a-z 0-9 _ . - starting with a letter or digit, "
            f"got {value!r}",
            field=what,
        )
    return value


def _choice(value: Any, what: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise RefusedError(f"{what} must be one of {', '.join(allowed)}; got {value!r}", field=what)
    return str(value)


def _cpu(value: Any, what: str = "cpu") -> float:
    """CPU share in CPUs: a positive number (0.25 = a quarter of one CPU)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise RefusedError(f"{what} must be a positive number of CPUs, got {value!r}", field=what)
    return round(float(value), 4)


def _uint(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RefusedError(f"{what} must be a non-negative integer, got {value!r}", field=what)
    return value


# ---- operations ---------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """Base of every operation. `name` is the wire name."""

    op: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **asdict(self)}


@dataclass(frozen=True)
class CreatePartition(Op):
    op: ClassVar[str] = "create_partition"
    name: str
    kind: str = "guest"
    cpu: float = 0.1
    memory: int = 0
    index: int = 0  # 0: the database picks the lowest free index


@dataclass(frozen=True)
class DestroyPartition(Op):
    op: ClassVar[str] = "destroy_partition"
    name: str


@dataclass(frozen=True)
class SetCpu(Op):
    op: ClassVar[str] = "set_cpu"
    name: str
    cpu: float


@dataclass(frozen=True)
class SetMemory(Op):
    op: ClassVar[str] = "set_memory"
    name: str
    memory: int


@dataclass(frozen=True)
class SetState(Op):
    op: ClassVar[str] = "set_state"
    name: str
    state: str


@dataclass(frozen=True)
class AddDevice(Op):
    op: ClassVar[str] = "add_device"
    name: str
    kind: str
    path: str
    server: str  # the I/O partition that owns the hardware
    size: int = 0  # bytes, as the I/O partition found the device (0: unknown)


@dataclass(frozen=True)
class RemoveDevice(Op):
    op: ClassVar[str] = "remove_device"
    name: str


@dataclass(frozen=True)
class Assign(Op):
    op: ClassVar[str] = "assign"
    device: str
    partition: str
    mode: str = "rw"  # rw: exclusive range; shared: writable, may overlap other shared; ro
    offset: int = 0  # byte range of the device the partition sees as its disk
    length: int = 0  # 0: to the end of the device


@dataclass(frozen=True)
class Unassign(Op):
    op: ClassVar[str] = "unassign"
    device: str
    partition: str


@dataclass(frozen=True)
class CreateChannel(Op):
    op: ClassVar[str] = "create_channel"
    name: str
    server: str
    client: str
    nslots: int = 256
    slot_size: int = 128


@dataclass(frozen=True)
class DestroyChannel(Op):
    op: ClassVar[str] = "destroy_channel"
    name: str


OPS: dict[str, type[Op]] = {
    c.op: c
    for c in (
        CreatePartition,
        DestroyPartition,
        SetCpu,
        SetMemory,
        SetState,
        AddDevice,
        RemoveDevice,
        Assign,
        Unassign,
        CreateChannel,
        DestroyChannel,
    )
}


def parse_op(d: Any) -> Op:
    """Turn a wire dictionary into a typed, field-checked operation."""
    if not isinstance(d, dict):
        raise RefusedError(f"an operation must be an object, got {type(d).__name__}", field="op")
    cls = OPS.get(d.get("op", ""))
    if cls is None:
        raise RefusedError(
            f"unknown operation {d.get('op')!r}; known: {', '.join(OPS)}", field="op"
        )
    known = {f.name for f in fields(cls)}
    extra = set(d) - known - {"op"}
    if extra:
        raise RefusedError(
            f"{cls.op}: unknown field(s) {', '.join(sorted(extra))}", field=sorted(extra)[0]
        )
    missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
    if missing:
        raise RefusedError(f"{cls.op}: missing field(s) {', '.join(missing)}", field=missing[0])
    args = {k: v for k, v in d.items() if k != "op"}
    for key in ("name", "device", "partition", "server", "client"):
        if key in args:
            _name(args[key], key)
    if "kind" in args:
        kinds = PARTITION_KINDS if cls is CreatePartition else DEVICE_KINDS
        _choice(args["kind"], "kind", kinds)
    if "state" in args:
        _choice(args["state"], "state", PARTITION_STATES)
    if "mode" in args:
        _choice(args["mode"], "mode", ASSIGN_MODES)
    if "cpu" in args:
        args["cpu"] = _cpu(args["cpu"])
    for key in ("memory", "index", "nslots", "slot_size", "size", "offset", "length"):
        if key in args:
            _uint(args[key], key)
    if "path" in args and (not isinstance(args["path"], str) or not args["path"]):
        raise RefusedError("path must be a non-empty string", field="path")
    return cls(**args)


# ---- records ------------------------------------------------------------------


@dataclass
class PartitionRecord:
    index: int
    name: str
    kind: str
    cpu: float
    memory: int
    state: str = "defined"


@dataclass
class DeviceRecord:
    name: str
    kind: str
    path: str
    server: str
    size: int = 0
    assigned: dict[str, str] = field(default_factory=dict)  # partition -> mode
    extents: dict[str, list[int]] = field(default_factory=dict)  # partition -> [offset, length]


@dataclass
class ChannelRecord:
    name: str
    server: str
    client: str
    nslots: int
    slot_size: int


Undo = Callable[[], object]


class ResourceDB:
    """Partitions, devices, channels and assignments, changed only through apply()."""

    def __init__(self, cpu_capacity: float, memory_bytes: int = DEFAULT_MEMORY_AREA) -> None:
        self.cpu_capacity = cpu_capacity
        self.pagemap = PageMap(memory_bytes)
        self.partitions: dict[str, PartitionRecord] = {}
        self.devices: dict[str, DeviceRecord] = {}
        self.channels: dict[str, ChannelRecord] = {}

    # -- queries
    def partition(self, name: str, what: str = "name") -> PartitionRecord:
        p = self.partitions.get(name)
        if p is None:
            raise RefusedError(f"no partition named {name!r}", field=what, errno=errno.ENOENT)
        return p

    def cpu_used(self, exclude: str = "") -> float:
        return round(sum(p.cpu for n, p in self.partitions.items() if n != exclude), 4)

    def _free_index(self) -> int:
        used = {p.index for p in self.partitions.values()}
        i = 1
        while i in used:
            i += 1
        return i

    def _check_cpu(self, name: str, cpu: float) -> None:
        used = self.cpu_used(exclude=name)
        if used + cpu > self.cpu_capacity + 1e-9:
            raise RefusedError(
                f"cpu {cpu} for {name!r} exceeds the host: {used} of {self.cpu_capacity} "
                f"CPUs already given",
                field="cpu",
                errno=errno.ENOSPC,
            )

    # -- mutation
    def apply(self, op: Op) -> Undo:
        """Validate and apply one operation; return its inverse. Raises RefusedError."""
        handler = getattr(self, "_" + op.op)
        undo: Undo = handler(op)
        return undo

    def _create_partition(self, op: CreatePartition) -> Undo:
        if op.name in self.partitions:
            raise RefusedError(
                f"partition {op.name!r} already exists", field="name", errno=errno.EEXIST
            )
        index = op.index or self._free_index()
        taken = any(p.index == index for p in self.partitions.values())
        if taken or not 0 < index < MAX_PARTITIONS:
            raise RefusedError(
                f"partition index {index} is taken or out of range",
                field="index",
                errno=errno.EEXIST,
            )
        self._check_cpu(op.name, op.cpu)
        memory, _ = self._grow(op.name, index, 0, op.memory)
        self.partitions[op.name] = PartitionRecord(index, op.name, op.kind, op.cpu, memory)

        def undo() -> None:
            self.pagemap.free_owner(index)
            self.partitions.pop(op.name)

        return undo

    def _destroy_partition(self, op: DestroyPartition) -> Undo:
        p = self.partition(op.name)
        for ch in self.channels.values():
            if op.name in (ch.server, ch.client):
                raise RefusedError(
                    f"partition {op.name!r} still has channel {ch.name!r}",
                    field="name",
                    errno=errno.EBUSY,
                )
        for dev in self.devices.values():
            if op.name in dev.assigned or dev.server == op.name:
                raise RefusedError(
                    f"partition {op.name!r} still uses device {dev.name!r}",
                    field="name",
                    errno=errno.EBUSY,
                )
        held = self.pagemap.extents_of(p.index)
        self.pagemap.free_owner(p.index)
        del self.partitions[op.name]

        def undo() -> None:
            if held:
                self.pagemap.claim(p.index, held)
            self.partitions[op.name] = p

        return undo

    def _set_cpu(self, op: SetCpu) -> Undo:
        p = self.partition(op.name)
        self._check_cpu(op.name, op.cpu)
        old, p.cpu = p.cpu, op.cpu
        return lambda: setattr(p, "cpu", old)

    def _grow(self, name: str, owner: int, have: int, want: int) -> tuple[int, list[Extent]]:
        """Allocate pages so `owner` holds `want` bytes (page-rounded).

        Returns that size and the extents newly allocated."""
        want = -(-want // PAGE_SIZE) * PAGE_SIZE
        if want <= have:
            return want, []
        try:
            added = self.pagemap.allocate(owner, want - have)
        except PageMapError as exc:
            raise RefusedError(
                f"memory {want} for {name!r}: {exc}", field="memory", errno=errno.ENOSPC
            ) from exc
        if len(self.pagemap.extents_of(owner)) > MAX_EXTENTS:
            self.pagemap.free(owner, added)
            raise RefusedError(
                f"memory {want} for {name!r}: free memory is too fragmented "
                f"(more than {MAX_EXTENTS} extents)",
                field="memory",
                errno=errno.ENOSPC,
            )
        return want, added

    def _set_memory(self, op: SetMemory) -> Undo:
        p = self.partition(op.name)
        old = p.memory
        new, added = self._grow(op.name, p.index, old, op.memory)
        released: list[Extent] = []
        if new < old:
            released = _tail(self.pagemap.extents_of(p.index), old - new)
            self.pagemap.free(p.index, released)
        p.memory = new

        def undo() -> None:
            if added:
                self.pagemap.free(p.index, added)
            elif released:
                self.pagemap.claim(p.index, released)
            p.memory = old

        return undo

    def memory_of(self, name: str) -> list[Extent]:
        """The extents (offsets in the partition-memory area) partition `name` holds."""
        return self.pagemap.extents_of(self.partition(name).index)

    def _set_state(self, op: SetState) -> Undo:
        p = self.partition(op.name)
        old, p.state = p.state, op.state
        return lambda: setattr(p, "state", old)

    def _add_device(self, op: AddDevice) -> Undo:
        if op.name in self.devices:
            raise RefusedError(
                f"device {op.name!r} already exists", field="name", errno=errno.EEXIST
            )
        srv = self.partition(op.server, "server")
        if srv.kind != "io":
            raise RefusedError(f"server {op.server!r} is not an I/O partition", field="server")
        for d in self.devices.values():
            if d.path == op.path:
                raise RefusedError(
                    f"path {op.path!r} is already device {d.name!r}",
                    field="path",
                    errno=errno.EBUSY,
                )
        self.devices[op.name] = DeviceRecord(op.name, op.kind, op.path, op.server, op.size)
        return lambda: self.devices.pop(op.name)

    def _device(self, name: str, what: str) -> DeviceRecord:
        d = self.devices.get(name)
        if d is None:
            raise RefusedError(f"no device named {name!r}", field=what, errno=errno.ENOENT)
        return d

    def _remove_device(self, op: RemoveDevice) -> Undo:
        d = self._device(op.name, "name")
        if d.assigned:
            raise RefusedError(
                f"device {op.name!r} is assigned to {', '.join(sorted(d.assigned))}",
                field="name",
                errno=errno.EBUSY,
            )
        del self.devices[op.name]
        return lambda: self.devices.__setitem__(op.name, d)

    def _assign(self, op: Assign) -> Undo:
        d = self._device(op.device, "device")
        self.partition(op.partition, "partition")
        if op.partition in d.assigned:
            raise RefusedError(
                f"device {op.device!r} is already assigned to {op.partition!r}",
                field="partition",
                errno=errno.EEXIST,
            )
        end = op.offset + op.length if op.length else d.size
        if op.offset % 512 or op.length % 512:
            raise RefusedError("offset and length must be multiples of 512", field="offset")
        if d.size and (end > d.size or op.offset >= d.size):
            raise RefusedError(
                f"range [{op.offset}, {end}) is outside device {op.device!r} ({d.size} bytes)",
                field="length",
                errno=errno.ERANGE,
            )
        if op.mode != "ro":
            for other, mode in d.assigned.items():
                lo, ln = d.extents.get(other, [0, 0])
                hi = lo + ln if ln else (d.size or 1 << 63)
                clash = op.offset < hi and lo < (end or 1 << 63)
                if clash and mode != "ro" and not (mode == op.mode == "shared"):
                    raise RefusedError(
                        f"range of device {op.device!r} overlaps what {other!r} writes",
                        field="offset",
                        errno=errno.EBUSY,
                    )
        d.assigned[op.partition] = op.mode
        d.extents[op.partition] = [op.offset, op.length]

        def undo() -> None:
            d.assigned.pop(op.partition)
            d.extents.pop(op.partition)

        return undo

    def _unassign(self, op: Unassign) -> Undo:
        d = self._device(op.device, "device")
        if op.partition not in d.assigned:
            raise RefusedError(
                f"device {op.device!r} is not assigned to {op.partition!r}",
                field="partition",
                errno=errno.ENOENT,
            )
        mode = d.assigned.pop(op.partition)
        ext = d.extents.pop(op.partition, [0, 0])

        def undo() -> None:
            d.assigned[op.partition] = mode
            d.extents[op.partition] = ext

        return undo

    def _create_channel(self, op: CreateChannel) -> Undo:
        if op.name in self.channels:
            raise RefusedError(
                f"channel {op.name!r} already exists", field="name", errno=errno.EEXIST
            )
        self.partition(op.server, "server")
        self.partition(op.client, "client")
        if op.server == op.client:
            raise RefusedError("a channel needs two different partitions", field="client")
        self.channels[op.name] = ChannelRecord(
            op.name, op.server, op.client, op.nslots, op.slot_size
        )
        return lambda: self.channels.pop(op.name)

    def _destroy_channel(self, op: DestroyChannel) -> Undo:
        ch = self.channels.get(op.name)
        if ch is None:
            raise RefusedError(f"no channel named {op.name!r}", field="name", errno=errno.ENOENT)
        del self.channels[op.name]
        return lambda: self.channels.__setitem__(op.name, ch)

    # -- persistence
    def snapshot(self) -> dict[str, Any]:
        """Canonical, JSON-ready state: equal databases give equal snapshots."""
        return {
            "cpu_capacity": self.cpu_capacity,
            "memory_bytes": self.pagemap.total_bytes,
            "partitions": {
                n: asdict(p)
                | {"extents": [[e.offset, e.length] for e in self.pagemap.extents_of(p.index)]}
                for n, p in sorted(self.partitions.items())
            },
            "devices": {
                n: asdict(d) | {"assigned": dict(sorted(d.assigned.items())),
                                "extents": dict(sorted(d.extents.items()))}
                for n, d in sorted(self.devices.items())
            },
            "channels": {n: asdict(c) for n, c in sorted(self.channels.items())},
        }


def _tail(extents: list[Extent], nbytes: int) -> list[Extent]:
    """The last `nbytes` of sorted page extents, as extents."""
    out: list[Extent] = []
    for e in reversed(extents):
        if nbytes <= 0:
            break
        take = min(nbytes, e.length)
        out.append(Extent(e.end - take, take))
        nbytes -= take
    return sorted(out, key=lambda e: e.offset)

