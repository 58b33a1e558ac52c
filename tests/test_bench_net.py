"""The NIC benchmark runs end to end (quick) and reports every path and ratio."""

from __future__ import annotations

import subprocess

import pytest

from bench import net

pytestmark = pytest.mark.system


def test_quick_net_benchmark_measures_every_path() -> None:
    doc = net.run(quick=True)
    keys = {r["key"] for r in doc["rows"]}
    for size in (64, 1500):
        assert {f"g2g {size}", f"uplink {size}", f"veth {size}", f"tap {size}"} <= keys
    for r in doc["rows"]:
        assert r["ops_per_s"] > 0, r
        if r["p50_us"] is not None:
            assert 0 < r["p50_us"] <= r["p99_us"] <= r["p999_us"], r
    assert set(doc["met"]) == {"g2g_rt_p50_us", "uplink_rt_vs_veth", "gbit_per_s_1500"}
    c = doc["counters"]
    # guest A blasts after its round trips left receive buffers posted: blast has buffers
    # of its own, else a frame from B delivered into one went out again as A's (spoofed)
    assert c["guest_a"]["spoofed"] == c["guest_b"]["spoofed"] == 0, c
    assert c["guest_b"]["rx_frames"] > 0 and c["uplink"]["tx_frames"] > 0
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "iopb" not in left and "iopart-up-" not in left
