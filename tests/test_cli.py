"""The command line, the build-stamp check and the benchmark report, as a user meets them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import iopart._native as native
from bench import report
from iopart.errors import StaleBuildError

IOPART = [sys.executable, "-m", "iopart.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IOPART, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.unit
def test_every_command_in_help_answers_its_own_help() -> None:
    res = run("--help")
    assert res.returncode == 0
    listed = re.findall(r"^    (\w+)\s{2,}\S", res.stdout, flags=re.M)
    assert {"version", "demo", "bench"} <= set(listed)
    for cmd in listed:
        sub = run(cmd, "--help")
        assert sub.returncode == 0, f"{cmd}: {sub.stderr}"
        assert f"usage: iopart {cmd}" in sub.stdout


@pytest.mark.unit
def test_version_json_matches_the_loaded_native_module() -> None:
    for argv in (("version", "--json"), ("--json", "version")):
        res = run(*argv)
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        assert info["native_build"] == native.build_stamp()
        assert info["native_abi"] == native.NATIVE_ABI


@pytest.mark.unit
def test_bad_arguments_exit_2_with_a_message() -> None:
    res = run("bench", "nope")
    assert res.returncode == 2
    assert "invalid choice" in res.stderr


@pytest.mark.unit
def test_stale_native_build_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_source_stamp", lambda: "0000000000000000")
    with pytest.raises(StaleBuildError, match="stale"):
        native._check_build()


@pytest.mark.unit
def test_source_stamp_matches_this_build() -> None:
    assert native._source_stamp() == native.build_stamp()


@pytest.mark.unit
def test_report_renders_rows_ratios_and_targets(tmp_path: Path) -> None:
    doc = {
        "bench": "demo",
        "command": "iopart bench demo",
        "when": "now",
        "seconds": 1,
        "rows": [
            {"path": "fast path", "p50_us": 0.5, "p99_us": 1.0, "p999_us": 2.0, "ops_per_s": 2e6}
        ],
        "ratios": {"speedup": 3.0},
        "targets": {"speedup": ">= 2"},
        "met": {"speedup": True},
    }
    (tmp_path / "demo.json").write_text(json.dumps(doc))
    text = report.render(tmp_path)
    assert "| fast path | 0.5 | 1 | 2 | 2,000,000 |" in text
    assert "| `speedup` | 3 | >= 2 | yes |" in text


@pytest.mark.system
def test_bench_channel_quick_json_schema() -> None:
    res = run("bench", "channel", "--quick", "--json", "--no-save", timeout=180)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["bench"] == "channel"
    paths = {r["path"] for r in doc["rows"]}
    assert {
        "iopart channel, spinning",
        "iopart channel, doorbell",
        "raw SPSC ring (peer, floor)",
        "eventfd ping-pong (peer, floor)",
    } <= paths
    for r in doc["rows"]:
        assert set(r) >= {"path", "p50_us", "p99_us", "p999_us", "ops_per_s"}
        assert r["ops_per_s"] > 0
        if r["p50_us"] is not None:
            assert 0 < r["p50_us"] <= r["p99_us"] <= r["p999_us"]
    assert set(doc["ratios"]) >= {"spin_vs_raw_ring", "doorbell_vs_eventfd", "mps_batched"}
    assert all(v > 0 for v in doc["ratios"].values())
