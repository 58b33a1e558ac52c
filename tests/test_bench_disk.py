"""The disk benchmark's machinery, tiny: every kind of path once, the JSON, the report, the PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import disk
from bench.blockrig import BlockRig, block_rig
from tests import blkutil

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]

ROW_KEYS = {"path", "key", "workload", "rw", "cache", "qd", "p50_us", "p99_us", "p999_us",
            "ops_per_s", "samples", "errors", "source", "setup", "baseline", "p50_vs_direct",
            "iops_vs_direct"}


def test_blkutil_reexports_the_bench_rig() -> None:
    assert blkutil.block_rig is block_rig
    assert blkutil.BlockRig is BlockRig


def test_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = disk.run(True, out_json=True, progress=False, tiny=True, results=tmp_path)

    # --json: one JSON object on stdout, the document without its histograms
    printed = json.loads(capsys.readouterr().out)
    assert printed["ratios"] == doc["ratios"]
    assert "histograms" not in printed

    assert doc["bench"] == "disk" and doc["quick"] is True and doc["tiny"] is True
    assert doc["seconds"] > 0
    kinds = {r["key"] for r in doc["rows"]}
    assert {"psync", "uring", "spin", "door", "nbdkit", "qsd"} <= kinds
    for r in doc["rows"]:
        assert set(r) >= ROW_KEYS, r
        assert 0 < r["p50_us"] <= r["p99_us"] <= r["p999_us"], r
        assert r["ops_per_s"] > 0 and r["samples"] > 0, r
        assert r["errors"] == 0, r
        assert r["p50_vs_direct"] > 0 and r["iops_vs_direct"] > 0, r

    assert set(disk.TARGETS) <= set(doc["ratios"])
    for k in disk.TARGETS:
        v = doc["ratios"][k]
        assert isinstance(v, int | float) and math.isfinite(v), (k, v)
        assert isinstance(doc["met"][k], bool)
        assert doc["targets"][k]
    assert doc["ratios"]["nbdkit_over_iopart_p50"] > 0
    assert doc["ratios"]["odirect_qd1_vs_direct"] > 0
    assert doc["ratios"]["qd32_iops_vs_iouring"] > 0
    # correctness, not speed: the 16 verified guests must pass even in the tiny run
    assert doc["ratios"]["guests16_verified"] == 1
    g = doc["guests16"]
    assert len(g["guests"]) == disk.N_GUESTS
    assert all(x["verified_bytes"] == g["extent_bytes"] for x in g["guests"])

    panels = doc["histograms"]["panels"]
    assert panels and all(p["paths"] for p in panels)

    saved = json.loads((tmp_path / "disk.json").read_text())
    assert saved["ratios"] == doc["ratios"]
    png = tmp_path / "disk_latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## disk (tiny)" in md and "disk_latency.png" in md
    assert "`qd32_iops_vs_iouring`" in md
