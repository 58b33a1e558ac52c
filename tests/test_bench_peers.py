"""Disk-latency peers: fio on a file, fio through nbdkit and qemu-storage-daemon over NBD."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.peers.fio import FioResult, fio_command, fio_version, run_fio
from bench.peers.nbd import NbdkitFile, QemuStorageDaemon

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

SIZE = 64 << 20
BS = 4096


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB file of real (non-sparse, non-zero) data."""
    path = tmp_path_factory.mktemp("peers") / "disk.img"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(SIZE >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return path


@pytest.fixture
def cpu() -> int:
    return min(os.sched_getaffinity(0))


def _sane(r: FioResult) -> None:
    assert r.ios > 0
    assert r.iops > 0
    assert 0 < r.p50_us <= r.p99_us <= r.p999_us
    assert r.mean_us > 0
    # A local 4 KiB I/O that takes a second means the plumbing, not the disk, is wrong.
    assert r.p50_us < 1_000_000


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pattern_write_lands(uri: str, disk: Path, offset: int) -> None:
    """Write one 4 KiB block of a fresh pattern through NBD, then find it in the file."""
    pattern = secrets.token_bytes(8)
    r = run_fio(
        "nbd-pattern",
        ioengine="nbd",
        uri=uri,
        rw="write",
        direct=False,
        offset=offset,
        size=BS,
        number_ios=1,
        timeout_s=30,
        extra_args=[f"--buffer_pattern=0x{pattern.hex()}", "--scramble_buffers=0"],
    )
    assert r.ios == 1
    with open(disk, "rb") as f:
        f.seek(offset)
        assert f.read(BS) == pattern * (BS // len(pattern))


def test_fio_version() -> None:
    assert fio_version().startswith("fio-")


def test_psync_direct_randread(disk: Path, cpu: int) -> None:
    r = run_fio(
        "psync-direct",
        filename=str(disk),
        ioengine="psync",
        rw="randread",
        direct=True,
        runtime_s=0.5,
        cpu=cpu,
    )
    _sane(r)
    assert r.name == "psync-direct"
    assert set(r.to_dict()) == {"name", "p50_us", "p99_us", "p999_us", "mean_us", "iops", "ios"}


def test_io_uring_qd4_randread(disk: Path) -> None:
    r = run_fio(
        "uring-qd4",
        filename=str(disk),
        ioengine="io_uring",
        rw="randread",
        iodepth=4,
        direct=True,
        runtime_s=0.3,
    )
    _sane(r)


def test_hot_page_cache_randread(disk: Path) -> None:
    r = run_fio(
        "psync-hot",
        filename=str(disk),
        ioengine="psync",
        rw="randread",
        direct=False,
        hot=True,
        runtime_s=0.3,
    )
    _sane(r)


def test_number_ios_is_exact_even_past_the_region(disk: Path) -> None:
    # 1 MiB region = 256 blocks; fio must wrap around to do 1000 I/Os.
    r = run_fio(
        "count",
        filename=str(disk),
        ioengine="psync",
        rw="randread",
        direct=True,
        size=1 << 20,
        number_ios=1000,
    )
    assert r.ios == 1000


def test_command_line_shape(disk: Path) -> None:
    cmd = fio_command(
        "x", filename=str(disk), ioengine="io_uring", rw="randwrite", iodepth=8, direct=True,
        runtime_s=0.25, cpu=1,
    )  # fmt: skip
    assert "--runtime=250ms" in cmd and "--time_based" in cmd
    assert "--cpus_allowed=1" in cmd and "--lat_percentiles=1" in cmd and "--thread" in cmd
    assert "--iodepth_batch_complete_min=1" in cmd
    nbd = fio_command("y", ioengine="nbd", uri="nbd+unix:///?socket=/s", rw="read", direct=False)
    assert "--uri=nbd+unix:///?socket=/s" in nbd
    assert not any(a.startswith("--filename") for a in nbd)
    with pytest.raises(ValueError):
        fio_command("z", filename=str(disk), ioengine="psync", rw="randrw", direct=True)
    with pytest.raises(ValueError):
        fio_command("z", filename=str(disk), ioengine="psync", rw="read", direct=True, hot=True)


def test_fio_unknown_engine_raises(disk: Path) -> None:
    with pytest.raises(RuntimeError, match="no-such-engine"):
        run_fio(
            "bad", filename=str(disk), ioengine="no-such-engine", rw="randread", direct=True,
            runtime_s=0.2, timeout_s=30,
        )  # fmt: skip


def test_fio_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="fio"):
        run_fio(
            "missing", filename=str(tmp_path / "nope" / "x"), ioengine="psync", rw="randread",
            direct=True, runtime_s=0.2, timeout_s=30,
        )  # fmt: skip


def test_fio_unreachable_nbd_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="nbd"):
        run_fio(
            "nobody", ioengine="nbd", uri=f"nbd+unix:///?socket={tmp_path}/none.sock",
            rw="randread", direct=False, runtime_s=0.2, timeout_s=30,
        )  # fmt: skip


def test_fio_timeout_kills_fio(disk: Path) -> None:
    name = f"hang-{secrets.token_hex(4)}"
    with pytest.raises(RuntimeError, match="killed"):
        run_fio(
            name, filename=str(disk), ioengine="psync", rw="randread", direct=True,
            runtime_s=30, timeout_s=0.5,
        )  # fmt: skip
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert f"--name={name}".encode() not in cmdline, f"fio left behind: pid {proc.name}"


def test_nbdkit_randread_and_write_lands(disk: Path, cpu: int) -> None:
    with NbdkitFile(disk, direct=True, fadvise="random", cpu=cpu) as srv:
        pid = srv.pid
        sock = srv.socket_path
        assert srv.uri == f"nbd+unix:///?socket={sock}"
        status = Path(f"/proc/{pid}/status").read_text()
        assert f"Cpus_allowed_list:\t{cpu}\n" in status
        assert "nbdkit" in Path(f"/proc/{pid}/comm").read_text()
        r = run_fio("nbdkit", ioengine="nbd", uri=srv.uri, rw="randread", direct=False,
                    runtime_s=0.5, timeout_s=30)  # fmt: skip
        _sane(r)
        _pattern_write_lands(srv.uri, disk, offset=5 * BS)
    assert not _alive(pid)
    assert not sock.exists()


@pytest.mark.parametrize("direct", [True, False])
def test_qemu_storage_daemon_randread_and_write_lands(disk: Path, cpu: int, direct: bool) -> None:
    with QemuStorageDaemon(disk, direct=direct, cpu=cpu) as srv:
        pid = srv.pid
        sock = srv.socket_path
        assert srv.uri == f"nbd+unix:///disk0?socket={sock}"
        assert f"Cpus_allowed_list:\t{cpu}\n" in Path(f"/proc/{pid}/status").read_text()
        r = run_fio("qsd", ioengine="nbd", uri=srv.uri, rw="randread", direct=False,
                    runtime_s=0.3, timeout_s=30)  # fmt: skip
        _sane(r)
        _pattern_write_lands(srv.uri, disk, offset=(9 + int(direct)) * BS)
    assert not _alive(pid)
    assert not sock.exists()
    assert srv.stderr == ""  # a clean start and stop logs nothing


def test_hot_through_nbd(disk: Path) -> None:
    with NbdkitFile(disk) as srv:
        r = run_fio("nbd-hot", ioengine="nbd", uri=srv.uri, rw="randread", direct=False,
                    hot=True, size=8 << 20, runtime_s=0.2, timeout_s=30)  # fmt: skip
        _sane(r)


@pytest.fixture
def pids() -> Iterator[list[int]]:
    seen: list[int] = []
    yield seen
    for pid in seen:
        assert not _alive(pid), f"server pid {pid} outlived its context"


def test_servers_stop_on_exception_in_body(disk: Path, pids: list[int]) -> None:
    for make in (lambda: NbdkitFile(disk), lambda: QemuStorageDaemon(disk, direct=False)):
        with pytest.raises(ZeroDivisionError), make() as srv:
            pids.append(srv.pid)
            _ = 1 // 0
        assert not srv.running


def test_server_start_failure_reports_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    work = tmp_path / "w"
    work.mkdir()
    with pytest.raises(RuntimeError, match=r"nbdkit exited .*missing\.img"):
        NbdkitFile(missing, workdir=work).start()
    with pytest.raises(RuntimeError, match=r"qemu-storage-daemon exited .*missing\.img"):
        QemuStorageDaemon(missing, direct=False, workdir=work).start()
    assert list(work.iterdir()) == []  # socket, pidfile and log directory all removed


def test_server_rejects_cpu_outside_affinity(disk: Path) -> None:
    with pytest.raises(ValueError):
        NbdkitFile(disk, cpu=10_000)
