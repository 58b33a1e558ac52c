"""The native block path in one process: both engines, the client API, O_DIRECT."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from iopart.client import Request
from iopart.drivers.blockserver import OP_FLUSH, OP_READ, OP_WRITE, Engine, Extent
from tests.blkutil import block_rig

pytestmark = pytest.mark.native
MIB = 1 << 20


def image_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_both_engines_keep_every_byte_at_every_queue_depth(tmp_path: Path) -> None:
    """Verifying loads at queue depth 1-16 through each engine: every block read back is
    what was last written there, and nothing outside the extent is touched."""
    for eng in (Engine.PSYNC, Engine.IO_URING):
        d = tmp_path / eng.name
        d.mkdir()
        rig = block_rig(d, engine=eng, disk_size=16 * MIB)
        try:
            _ep, disk = rig.endpoint(Extent(2 * MIB, 8 * MIB))
            v = disk.new_versions()
            for qd, seq, wp in ((4, True, 100), (16, False, 50), (1, False, 30)):
                r = disk.run_job(n_ops=3000, queue_depth=qd, write_pct=wp, verify=True,
                                 sequential=seq, versions=v, seed=7, latencies=False)
                assert r.errors == 0 and r.verify_failures == 0, (eng, r)
            r = disk.run_job(n_ops=2048, queue_depth=8, write_pct=0, verify=True,
                             sequential=True, versions=v, seed=7, latencies=False)
            assert r.verified_bytes == 8 * MIB and r.verify_failures == 0
            disk.flush()
            st = rig.server.stats(_ep)
            assert st.refused == 0 and st.errors == 0 and st.flushes == 1
            assert sum(st.hist) == st.ops
        finally:
            rig.close()
        raw = (d / "disk.img").read_bytes()
        assert raw[: 2 * MIB] == bytes(2 * MIB) and raw[10 * MIB :] == bytes(6 * MIB)


@pytest.mark.parametrize("engine", [Engine.PSYNC, Engine.IO_URING])
def test_qd1_loads_leave_identical_images_on_both_engines(tmp_path: Path,
                                                          engine: Engine) -> None:
    d = tmp_path / "e"
    d.mkdir()
    rig = block_rig(d, engine=engine, disk_size=8 * MIB)
    try:
        _ep, disk = rig.endpoint(Extent(0, 4 * MIB))
        v = disk.new_versions()
        r = disk.run_job(n_ops=5000, queue_depth=1, write_pct=70, verify=True, versions=v,
                         seed=99, latencies=False)
        assert r.errors == 0 and r.verify_failures == 0
    finally:
        rig.close()
    # at queue depth 1 the order of requests is fixed by the seed: the images must match
    # a reference made the same way with the other engine
    ref = tmp_path / "ref"
    ref.mkdir()
    other = Engine.IO_URING if engine is Engine.PSYNC else Engine.PSYNC
    rig = block_rig(ref, engine=other, disk_size=8 * MIB)
    try:
        _ep, disk = rig.endpoint(Extent(0, 4 * MIB))
        v = disk.new_versions()
        disk.run_job(n_ops=5000, queue_depth=1, write_pct=70, verify=True, versions=v,
                     seed=99, latencies=False)
    finally:
        rig.close()
    assert image_digest(d / "disk.img") == image_digest(ref / "disk.img")


@pytest.mark.parametrize("engine", [Engine.PSYNC, Engine.IO_URING])
def test_client_reads_writes_any_range_and_batches(tmp_path: Path, engine: Engine) -> None:
    rig = block_rig(tmp_path, engine=engine, disk_size=8 * MIB)
    try:
        _ep, disk = rig.endpoint(Extent(MIB, 2 * MIB))
        disk.write(5, b"hello, disk")  # not sector aligned: read-modify-write
        assert disk.read(0, 20) == bytes(5) + b"hello, disk" + bytes(4)
        bufs = [disk.memory.alloc(4096) for _ in range(8)]
        for i, b in enumerate(bufs):
            b.view[:] = bytes([i + 1]) * 4096
        st = disk.submit([Request(OP_WRITE, (i + 1) * 4096, b) for i, b in enumerate(bufs)])
        assert st == [0] * 8
        for b in bufs:
            b.view[:] = bytes(4096)
        st = disk.submit([*(Request(OP_READ, (i + 1) * 4096, b) for i, b in enumerate(bufs)),
                          Request(OP_FLUSH, 0)])
        assert st == [0] * 9
        assert all(bytes(b.view) == bytes([i + 1]) * 4096 for i, b in enumerate(bufs))
        with pytest.raises(Exception, match="out of range"):
            disk.read(2 * MIB - 512, 1024)  # past the extent
    finally:
        rig.close()
    raw = (tmp_path / "disk.img").read_bytes()
    assert raw[MIB + 5 : MIB + 16] == b"hello, disk"
    assert raw[MIB + 4096 : MIB + 8192] == b"\x01" * 4096


def test_o_direct_endpoint_reads_what_was_written(tmp_path: Path) -> None:
    rig = block_rig(tmp_path, engine=Engine.IO_URING, disk_size=8 * MIB)
    try:
        _ep, disk = rig.endpoint(Extent(0, 4 * MIB), direct=True)
        v = disk.new_versions()
        r = disk.run_job(n_ops=1024, queue_depth=8, write_pct=100, verify=True,
                         sequential=True, versions=v, latencies=False)
        r2 = disk.run_job(n_ops=1024, queue_depth=32, write_pct=0, verify=True,
                          sequential=True, versions=v, latencies=False)
        assert r.errors == r2.errors == 0 and r2.verified_bytes == 4 * MIB
    finally:
        rig.close()
    with open(tmp_path / "disk.img", "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read(16) != bytes(16)  # the stamps reached the file
