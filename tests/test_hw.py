"""Hardware discovery against real kernel devices: loop disks, TAP and veth NICs, uevents."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from iopart import hw
from iopart.errors import IopartError

pytestmark = pytest.mark.system

LOOP_BYTES = 16 * 1024 * 1024
Dev = TypeVar("Dev", hw.BlockDevice, hw.NetDevice)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def unique_ifname(prefix: str = "iophw") -> str:
    name = prefix + secrets.token_hex(3)
    assert len(name) <= 15
    return name


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def delete_link(name: str) -> None:
    if link_exists(name):
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
    assert not link_exists(name), f"could not delete {name}"


@pytest.fixture(autouse=True)
def _root_and_tools() -> None:
    assert os.geteuid() == 0, "these tests create loop and TAP devices: run them as root"
    for tool in ("losetup", "ip"):
        assert shutil.which(tool), f"{tool} is missing"


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(LOOP_BYTES)
    return img


def attach_loop(img: Path) -> str:
    return run("losetup", "--find", "--show", str(img))


def detach_loop(devnode: str) -> None:
    subprocess.run(["losetup", "--detach", devnode], check=False, capture_output=True)


@pytest.fixture
def loop_device(backing: Path) -> Iterator[tuple[str, Path]]:
    devnode = attach_loop(backing)
    try:
        yield devnode, backing
    finally:
        detach_loop(devnode)


@pytest.fixture
def tap_device() -> Iterator[str]:
    name = unique_ifname()
    try:
        run("ip", "tuntap", "add", "dev", name, "mode", "tap")
        yield name
    finally:
        delete_link(name)


def by_name(devices: Sequence[Dev], name: str) -> Dev:
    matches = [d for d in devices if d.name == name]
    assert len(matches) == 1, f"{name} not listed once in {[d.name for d in devices]}"
    return matches[0]


# --- block ----------------------------------------------------------------------------------


def test_loop_device_is_listed_with_size_and_backing_file(loop_device: tuple[str, Path]) -> None:
    devnode, img = loop_device
    name = os.path.basename(devnode)
    bd = by_name(hw.block_devices(), name)
    assert bd.kind == "loop"
    assert bd.devnode == devnode
    assert bd.size_bytes == LOOP_BYTES
    assert bd.backing_file == os.path.realpath(img)
    assert bd.logical_block_size in (512, 1024, 2048, 4096)
    assert bd.read_only is False
    assert bd.to_dict()["size_bytes"] == LOOP_BYTES


def test_find_block_device_by_devnode_and_name(loop_device: tuple[str, Path]) -> None:
    devnode, _ = loop_device
    name = os.path.basename(devnode)
    found = hw.find_block_device(devnode)
    assert found is not None and found.name == name
    assert hw.find_block_device(name) == found
    assert hw.find_block_device("/dev/iopart-no-such-disk") is None
    assert hw.find_block_device("no-such-disk") is None


def test_block_devices_are_sorted_and_nonempty_by_default() -> None:
    devices = hw.block_devices()
    assert [d.name for d in devices] == sorted(d.name for d in devices)
    assert all(d.size_bytes > 0 for d in devices)
    everything = hw.block_devices(include_empty=True)
    assert {d.name for d in devices} <= {d.name for d in everything}


def test_detached_loop_device_is_empty_and_hidden(backing: Path) -> None:
    devnode = attach_loop(backing)
    detach_loop(devnode)  # the device node stays, with size 0
    name = os.path.basename(devnode)
    assert name not in {d.name for d in hw.block_devices()}
    empty = by_name(hw.block_devices(include_empty=True), name)
    assert (empty.kind, empty.size_bytes, empty.backing_file) == ("loop", 0, "")


# --- net ------------------------------------------------------------------------------------


def test_tap_device_is_listed_with_its_mac(tap_device: str) -> None:
    mac = Path("/sys/class/net", tap_device, "address").read_text().strip()
    nd = by_name(hw.net_devices(), tap_device)
    assert nd.kind == "tap"
    assert nd.mac == mac.lower() and len(mac) == 17
    assert nd.ifindex == int(Path("/sys/class/net", tap_device, "ifindex").read_text())
    assert nd.mtu > 0
    assert nd.driver == "tun"


def test_tun_device_is_kind_tun() -> None:
    name = unique_ifname()
    try:
        run("ip", "tuntap", "add", "dev", name, "mode", "tun")
        assert by_name(hw.net_devices(), name).kind == "tun"
    finally:
        delete_link(name)


def test_veth_pair_is_kind_veth() -> None:
    a, b = unique_ifname(), unique_ifname("iophv")
    try:
        run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        devices = hw.net_devices()
        assert by_name(devices, a).kind == "veth"
        assert by_name(devices, b).kind == "veth"
    finally:
        delete_link(a)  # takes the peer with it
        delete_link(b)


def test_lo_is_loopback() -> None:
    lo = by_name(hw.net_devices(), "lo")
    assert lo.kind == "loopback"
    assert lo.ifindex == 1
    assert lo.mtu > 0


def test_report_is_json_and_sorted() -> None:
    report = hw.hw_report()
    assert set(report) == {"block", "net"}
    json.dumps(report)
    names = [d["name"] for d in report["net"]]
    assert "lo" in names
    assert names == sorted(str(n) for n in names)


# --- hot-plug -------------------------------------------------------------------------------


def test_watch_sees_tap_and_loop_created_while_watching(backing: Path) -> None:
    name = unique_ifname()
    ready = threading.Event()
    devnode = ""
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(hw.watch, 3.0, ready=ready)
        try:
            assert ready.wait(10), "watch() never started listening"
            run("ip", "tuntap", "add", "dev", name, "mode", "tap")
            delete_link(name)
            devnode = attach_loop(backing)
        finally:
            delete_link(name)
            if devnode:
                detach_loop(devnode)
        events = future.result(timeout=15)
    assert ("add", "net", name) in events
    assert ("remove", "net", name) in events
    loop_name = os.path.basename(devnode)
    assert any(sub == "block" and dev == loop_name for _, sub, dev in events), events
    assert all(sub in ("block", "net") for _, sub, _ in events)


def test_watch_is_bounded() -> None:
    assert isinstance(hw.watch(0.0), list)
    with pytest.raises(ValueError):
        hw.watch(-1.0)
    with pytest.raises(ValueError):
        hw.watch(float("inf"))


# --- errors ---------------------------------------------------------------------------------


class _NoSysfs:
    """Stands in for pyudev.Context when /sys is empty."""

    def __init__(self, sys_path: str) -> None:
        self.sys_path = sys_path


def test_unreadable_sysfs_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("iopart.hw.pyudev.Context", lambda: _NoSysfs(str(tmp_path)))
    for call in (hw.block_devices, hw.net_devices, hw.hw_report):
        with pytest.raises(IopartError) as info:
            call()
        assert isinstance(info.value, hw.HardwareError)
        assert info.value.kind == "hardware"
        assert str(tmp_path / "class") in info.value.message
        assert "sysfs" in info.value.message
