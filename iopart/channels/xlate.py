"""A client partition's region table, as the native translation layer sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iopart._native import check, ffi, lib

MAX_REGIONS = int(lib.IOP_XLATE_MAX_REGIONS)


@dataclass(frozen=True)
class Region:
    """PRPA [prpa, prpa+len) of a client maps to pool [pool_off, pool_off+len)."""

    prpa: int
    len: int
    pool_off: int
    access: int = int(lib.IOP_ACCESS_READ | lib.IOP_ACCESS_WRITE)


class RegionTable:
    """Owns one `struct iop_xlate_table` (here in private memory)."""

    def __init__(self, pool_len: int) -> None:
        self.table: Any = ffi.new("struct iop_xlate_table *")
        lib.iop_xlate_init(self.table, pool_len)

    def set(self, regions: list[Region]) -> None:
        arr = ffi.new("struct iop_region[]", max(len(regions), 1))
        for i, r in enumerate(regions):
            arr[i].prpa, arr[i].len, arr[i].pool_off, arr[i].access = (
                r.prpa,
                r.len,
                r.pool_off,
                r.access,
            )
        check(int(lib.iop_xlate_set(self.table, arr, len(regions))), "set regions")

    @property
    def generation(self) -> int:
        return int(self.table.generation)

    def translate(self, prpa: int, length: int, access: int) -> tuple[list[tuple[int, int]], int]:
        """[(pool_off, len), ...] and the generation; NativeError on refusal."""
        sg = ffi.new("struct iop_sg[]", 16)
        gen = ffi.new("uint32_t *")
        n = check(int(lib.iop_xlate(self.table, prpa, length, access, sg, 16, gen)), "translate")
        return [(int(sg[i].pool_off), int(sg[i].len)) for i in range(n)], int(gen[0])

    def valid(self, generation: int) -> bool:
        return bool(lib.iop_xlate_valid(self.table, generation))
