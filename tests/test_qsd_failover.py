"""Failover peer: qemu-storage-daemon SIGKILLed and restarted under the retrying nbdretry client."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.peers.qsd_failover import (
    NbdRetryClient,
    RestartableQsd,
    match_outages,
    measure_qsd_failover,
)

FAULTS = 5
SPAN = 16 << 20


def _procs_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (our qsd and client carry tmp_path in argv)."""
    found: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(proc.name))
    return found


@pytest.mark.unit
def test_match_outages_pairs_each_fault_with_the_next_recovery() -> None:
    outages = [[10, 12, 20, 25], [40, 41, 50, 55]]
    # The second fault's timestamp precedes a completion that slipped in before the kill.
    assert match_outages([11, 39], outages) == outages
    with pytest.raises(RuntimeError, match="2 faults but 1"):
        match_outages([11, 39], outages[:1])
    with pytest.raises(RuntimeError, match="no client outage"):
        match_outages([11, 60], outages)


@pytest.mark.system
@pytest.mark.timeout(60)
def test_every_fault_stalls_once_and_loses_nothing(tmp_path: Path) -> None:
    seen: list[int] = []
    r = measure_qsd_failover(FAULTS, workdir=tmp_path, image_mib=16, progress=seen.append)
    assert seen == list(range(1, FAULTS + 1))
    assert r["faults"] == FAULTS
    assert len(r["stalls_ms"]) == FAULTS
    assert all(0 < s < 5000 for s in r["stalls_ms"])
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] < 5000
    assert r["ops"] > 0
    assert r["reconnects"] >= FAULTS
    assert r["post_fault_checks"] > 0  # acked writes were read back after each restart
    assert r["lost"] == 0
    assert r["verify_failures"] == 0
    assert r["qsd_version"]
    assert list(tmp_path.iterdir()) == []  # image, status, socket directory removed
    assert _procs_mentioning(str(tmp_path)) == []


@pytest.mark.system
@pytest.mark.timeout(60)
def test_failure_midway_stops_everything(tmp_path: Path) -> None:
    def boom(i: int) -> None:
        raise ZeroDivisionError(i)

    with pytest.raises(ZeroDivisionError):
        measure_qsd_failover(3, workdir=tmp_path, image_mib=16, progress=boom)
    assert list(tmp_path.iterdir()) == []
    assert _procs_mentioning(str(tmp_path)) == []


@pytest.mark.system
@pytest.mark.timeout(60)
def test_lost_writes_are_detected(tmp_path: Path) -> None:
    """The verifier is not vacuous: wiping the image while qsd is down shows up as lost."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, SPAN)
    with RestartableQsd(image, workdir=None) as srv:
        client = NbdRetryClient(
            srv.socket_path, export=srv.export_name, span=SPAN, workdir=tmp_path
        )
        try:
            client.wait_for("writes", lambda: client.status()[0] > 1000, 10.0)
            srv.kill()
            os.truncate(image, 0)  # every acknowledged write is gone
            os.truncate(image, SPAN)
            srv.respawn()
            client.wait_recovered(1, 10.0)
            res = client.finish()
        finally:
            client.close()
    assert res["lost"] > 0
    assert res["reconnects"] == 1
