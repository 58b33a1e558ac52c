"""Disk backends of an I/O partition: image files, block devices and loop devices.

A `Disk` holds two descriptors of the same device: a buffered one (the page cache
serves hot reads) and, where the file system allows it, an O_DIRECT one. An
endpoint chooses which one its requests use. Nothing here is on the data path:
the native block server gets the fds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from iopart.errors import IopartError

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
SECTOR = 512


class DiskError(IopartError):
    kind = "disk"


@dataclass(frozen=True)
class DiskInfo:
    path: str
    kind: str  # "file" or "block"
    size: int
    logical_block_size: int
    direct: bool
    read_only: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "kind": self.kind,
            "size": self.size,
            "logical_block_size": self.logical_block_size,
            "direct": self.direct,
            "read_only": self.read_only,
        }


def create_image(path: Path, size: int) -> None:
    """A sparse image file of `size` bytes (a whole number of sectors); never truncates."""
    if size <= 0 or size % SECTOR:
        raise DiskError(f"image size must be a positive multiple of {SECTOR}, got {size}",
                        errno=errno.EINVAL)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


class Disk:
    """An opened disk: buffered fd, O_DIRECT fd (or -1), size."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = str(path)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise DiskError(f"disk {self.path}: {exc.strerror}", errno=exc.errno or 0) from exc
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DiskError(f"disk {self.path} is neither a file nor a block device",
                            errno=errno.EINVAL)
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            raise DiskError(f"cannot open disk {self.path}: {exc.strerror}",
                            errno=exc.errno or 0) from exc
        self.kind = "block" if stat.S_ISBLK(st.st_mode) else "file"
        self.read_only = read_only
        if self.kind == "block":
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            self.size = int(struct.unpack("Q", buf)[0])
            lbs = fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4)
            self.logical_block_size = int(struct.unpack("i", lbs)[0])
        else:
            self.size = st.st_size - st.st_size % SECTOR
            self.logical_block_size = SECTOR
        try:
            self.direct_fd = os.open(self.path, flags | os.O_DIRECT)
        except OSError:
            self.direct_fd = -1  # e.g. tmpfs: buffered only

    def fd_for(self, direct: bool) -> int:
        if direct and self.direct_fd < 0:
            raise DiskError(f"disk {self.path} does not support O_DIRECT", errno=errno.EINVAL)
        return self.direct_fd if direct else self.fd

    def info(self) -> DiskInfo:
        return DiskInfo(self.path, self.kind, self.size, self.logical_block_size,
                        self.direct_fd >= 0, self.read_only)

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
