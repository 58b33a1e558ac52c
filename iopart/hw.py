"""Hardware discovery for `iopart hw`: the host's block and network devices, read from sysfs.

This module owns the read-only inventory of what the I/O partitions could serve: block
devices (disks, partitions, loop and device-mapper devices) and network interfaces
(physical NICs, TAP/TUN, veth, bridges, loopback, ...). Devices are enumerated with pyudev
from the current mount namespace's /sys and network namespace; their attributes are read
from sysfs directly (there is no udev database to rely on). `watch()` listens to kernel
uevents for a bounded time so callers can notice hot-plugged devices. Nothing here changes
the host.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import math
import os
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyudev

from iopart.errors import IopartError

__all__ = [
    "BlockDevice",
    "HardwareError",
    "NetDevice",
    "block_devices",
    "find_block_device",
    "hw_report",
    "net_devices",
    "watch",
]

SECTOR_BYTES = 512  # /sys/class/block/*/size is always in 512-byte sectors
LOOP_MAJOR = 7
ARPHRD_LOOPBACK = 772
IFF_TUN = 0x0001
IFF_TAP = 0x0002
SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x00000003
_DRVINFO_SIZE = 196  # sizeof(struct ethtool_drvinfo)
_IFREQ_SIZE = 40  # sizeof(struct ifreq) on LP64
WATCHED_SUBSYSTEMS = ("block", "net")

# Reading an attribute that fails with one of these means "absent, not applicable, or the
# device went away while we looked": the attribute gets its default, it is not an error.
_ABSENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTDIR}
)


class HardwareError(IopartError):
    """Device discovery failed: sysfs or the uevent socket is unusable."""

    kind = "hardware"


@dataclass(frozen=True)
class BlockDevice:
    name: str
    devnode: str
    kind: str
    size_bytes: int
    logical_block_size: int
    read_only: bool
    rotational: bool | None
    model: str
    backing_file: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class NetDevice:
    name: str
    kind: str
    mac: str
    mtu: int
    operstate: str
    driver: str
    ifindex: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- sysfs access ---------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    """One sysfs attribute, stripped; None if it is absent or the device is gone."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        if exc.errno in _ABSENT_ERRNOS:
            return None
        raise HardwareError(
            f"cannot read {path}: {exc.strerror or exc}", errno=exc.errno or 0
        ) from exc


def _read_int(path: Path, default: int | None = None, base: int = 10) -> int | None:
    text = _read(path)
    if text is None or text == "":
        return default
    try:
        return int(text, base)
    except ValueError:
        return default


def _context(subsystem: str) -> Any:
    """A pyudev context whose sysfs class directory for `subsystem` is readable."""
    try:
        ctx = pyudev.Context()
    except (ImportError, OSError) as exc:
        raise HardwareError(f"cannot open libudev: {exc}") from exc
    class_dir = Path(ctx.sys_path) / "class" / subsystem
    try:
        os.listdir(class_dir)
    except OSError as exc:
        raise HardwareError(
            f"cannot read {class_dir}: {exc.strerror or exc}; is sysfs mounted at {ctx.sys_path}?",
            errno=exc.errno or 0,
        ) from exc
    return ctx


def _list(subsystem: str) -> list[Any]:
    ctx = _context(subsystem)
    try:
        return list(ctx.list_devices(subsystem=subsystem))
    except OSError as exc:
        raise HardwareError(
            f"cannot enumerate {subsystem} devices: {exc.strerror or exc}",
            errno=exc.errno or 0,
        ) from exc


# --- block ----------------------------------------------------------------------------------


def _block_kind(sys_dir: Path, devtype: str) -> str:
    if devtype == "disk":
        dev = _read(sys_dir / "dev") or ""  # "major:minor"
        try:
            major: int | None = int(dev.split(":", 1)[0])
        except ValueError:
            major = None
        if major == LOOP_MAJOR or (sys_dir / "loop").is_dir():
            return "loop"
        if (sys_dir / "dm").is_dir():
            return "dm"
        if (sys_dir / "md").is_dir():
            return "md"
    return devtype or "block"


def _block_device(device: Any) -> BlockDevice | None:
    sys_dir = Path(device.sys_path)
    sectors = _read_int(sys_dir / "size")
    if sectors is None:  # not a usable block device, or it vanished while we looked
        return None
    devtype = str(device.device_type or "")
    # Queue limits and the model belong to the whole disk, one level up from a partition.
    disk_dir = sys_dir.parent if devtype == "partition" else sys_dir
    name = str(device.sys_name)
    rotational = _read_int(disk_dir / "queue" / "rotational")
    return BlockDevice(
        name=name,
        devnode=str(device.device_node or f"/dev/{name}"),
        kind=_block_kind(sys_dir, devtype),
        size_bytes=sectors * SECTOR_BYTES,
        logical_block_size=_read_int(disk_dir / "queue" / "logical_block_size") or SECTOR_BYTES,
        read_only=_read_int(sys_dir / "ro", default=0) == 1,
        rotational=None if rotational is None else rotational == 1,
        model=_read(disk_dir / "device" / "model") or "",
        backing_file=_read(sys_dir / "loop" / "backing_file") or "",
    )


def block_devices(*, include_empty: bool = False) -> list[BlockDevice]:
    """Every block device, sorted by name; size-0 ones (idle loop devices) only on request."""
    found: list[BlockDevice] = []
    for device in _list("block"):
        bd = _block_device(device)
        if bd is not None and (include_empty or bd.size_bytes > 0):
            found.append(bd)
    return sorted(found, key=lambda d: d.name)


def find_block_device(path: str) -> BlockDevice | None:
    """The block device whose devnode or name is `path` (symlinks in /dev are followed)."""
    if "/" in path:
        devnodes = {path, os.path.realpath(path)}
        names: set[str] = set()
    else:
        devnodes, names = set(), {path}
    for bd in block_devices(include_empty=True):
        if bd.devnode in devnodes or bd.name in names:
            return bd
    return None


# --- net ------------------------------------------------------------------------------------


def _ethtool_driver(name: str) -> str:
    """The driver name ethtool reports for `name`, or "" (ETHTOOL_GDRVINFO, no privilege)."""
    encoded = name.encode()
    if not encoded or len(encoded) >= 16:
        return ""
    info = ctypes.create_string_buffer(_DRVINFO_SIZE)
    struct.pack_into("=I", info, 0, ETHTOOL_GDRVINFO)
    ifreq = struct.pack("16sP", encoded, ctypes.addressof(info)).ljust(_IFREQ_SIZE, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    except OSError:
        return ""
    return info.raw[4:36].split(b"\0", 1)[0].decode(errors="replace")


def _net_kind(sys_dir: Path, devtype: str, driver: str) -> str:
    if _read_int(sys_dir / "type") == ARPHRD_LOOPBACK:
        return "loopback"
    tun_flags = _read_int(sys_dir / "tun_flags", base=16)
    if tun_flags is not None:
        return "tap" if tun_flags & IFF_TAP else "tun"
    if (sys_dir / "device").exists():
        return "physical"
    if (sys_dir / "bridge").is_dir():
        return "bridge"
    return devtype or driver or "virtual"


def _net_device(device: Any) -> NetDevice | None:
    sys_dir = Path(device.sys_path)
    ifindex = _read_int(sys_dir / "ifindex")
    if ifindex is None:  # vanished while we looked
        return None
    name = str(device.sys_name)
    driver_link = sys_dir / "device" / "driver"
    try:
        driver = os.path.basename(os.readlink(driver_link))
    except OSError:
        driver = _ethtool_driver(name)
    return NetDevice(
        name=name,
        kind=_net_kind(sys_dir, str(device.device_type or ""), driver),
        mac=(_read(sys_dir / "address") or "").lower(),
        mtu=_read_int(sys_dir / "mtu", default=0) or 0,
        operstate=_read(sys_dir / "operstate") or "unknown",
        driver=driver,
        ifindex=ifindex,
    )


def net_devices() -> list[NetDevice]:
    """Every network interface of the current network namespace, sorted by name."""
    found = [nd for nd in map(_net_device, _list("net")) if nd is not None]
    return sorted(found, key=lambda d: d.name)


# --- report and hot-plug --------------------------------------------------------------------


def hw_report() -> dict[str, list[dict[str, object]]]:
    """{"block": [...], "net": [...]} as plain dicts, for `iopart hw --json`."""
    return {
        "block": [d.to_dict() for d in block_devices()],
        "net": [d.to_dict() for d in net_devices()],
    }


def watch(timeout_s: float, *, ready: threading.Event | None = None) -> list[tuple[str, str, str]]:
    """(action, subsystem, name) kernel uevents for block and net devices, for timeout_s.

    Returns after exactly the timeout (never longer, give or take one poll wake-up), with the
    events in arrival order. `ready`, if given, is set once the uevent socket is listening,
    so a caller in another thread knows that a device it creates from then on will be seen.
    """
    if not math.isfinite(timeout_s) or timeout_s < 0:
        raise ValueError(f"watch timeout must be a finite number >= 0, not {timeout_s!r}")
    ctx = _context("block")
    try:
        monitor = pyudev.Monitor.from_netlink(ctx, source="kernel")
        for subsystem in WATCHED_SUBSYSTEMS:
            monitor.filter_by(subsystem)
        monitor.start()
    except OSError as exc:
        raise HardwareError(
            f"cannot listen for kernel uevents: {exc.strerror or exc}", errno=exc.errno or 0
        ) from exc
    if ready is not None:
        ready.set()
    events: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            # poll() returns None on timeout and also for a message libudev filtered out.
            device = monitor.poll(timeout=max(remaining, 0.001))
        except OSError as exc:
            raise HardwareError(
                f"reading kernel uevents failed: {exc.strerror or exc}", errno=exc.errno or 0
            ) from exc
        if device is None:  # `if device` would use Device's deprecated Mapping __len__
            continue
        subsystem = str(device.subsystem or "")
        if subsystem in WATCHED_SUBSYSTEMS:
            events.append((str(device.action or ""), subsystem, str(device.sys_name)))
    return events
