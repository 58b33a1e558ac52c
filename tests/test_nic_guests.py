"""Guests share the I/O partition's NIC: unmodified ping, socat and iperf3 in their
own network namespaces, bridged to the virtual switch; the default uplink's far end
(10.78.0.1, in a namespace of its own) answers too."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.stackutil import IOPART, Stack, cli

pytestmark = pytest.mark.system


def guest_cmd(s: Stack, name: str, ip: str, *prog: str) -> list[str]:
    return [*IOPART, "guest", "run", name, *s.sd(), "--memory", "16M", "--netns", "--ip", ip,
            "--", *prog]


def uplink_ns(s: Stack) -> str:
    doc = s.cli_json("nic", "list")
    (nic,) = [n for n in doc["nics"] if n["name"] == "nic0"]
    ns: str = nic["uplink"]["peer_netns"]
    return ns


def test_ping_between_guests_and_to_the_uplink(stack: Stack) -> None:
    res = subprocess.run(guest_cmd(stack, "pa", "10.78.0.21/24", "ping", "-c", "3", "-i",
                                   "0.2", "-W", "2", "10.78.0.1"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 received" in res.stdout
    server = subprocess.Popen(guest_cmd(stack, "pb", "10.78.0.22/24", "sleep", "8"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        res = subprocess.run(guest_cmd(stack, "pc", "10.78.0.23/24", "ping", "-c", "3", "-i",
                                       "0.2", "-W", "2", "10.78.0.22"),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "3 received" in res.stdout
    finally:
        server.kill()
        server.communicate(timeout=30)


def test_tcp_and_udp_with_socat_guest_to_guest_and_to_the_uplink(stack: Stack) -> None:
    echo = subprocess.Popen(guest_cmd(stack, "echo", "10.78.0.31/24", "socat", "-T", "10",
                                      "TCP-LISTEN:7000,reuseaddr", "SYSTEM:cat"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        res = subprocess.run(guest_cmd(stack, "tcpc", "10.78.0.32/24", "sh", "-c",
                                       "echo over-iopart | socat -T 5 - "
                                       "TCP:10.78.0.31:7000,retry=50,interval=0.2"),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "over-iopart" in res.stdout
    finally:
        echo.kill()
        echo.communicate(timeout=30)
    sink = subprocess.Popen(guest_cmd(stack, "udps", "10.78.0.35/24", "socat", "-T", "10", "-u",
                                      "UDP-RECV:7003", "STDOUT"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        for _ in range(3):
            res = subprocess.run(guest_cmd(stack, "udpg", "10.78.0.36/24", "sh", "-c",
                                           "echo g2g-datagram | socat -u - UDP:10.78.0.35:7003"),
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
        out, _ = sink.communicate(timeout=30)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.communicate()
    assert "g2g-datagram" in out
    ns = uplink_ns(stack)
    udp = subprocess.Popen(["ip", "netns", "exec", ns, "socat", "-T", "10", "-u",
                            "UDP-RECV:7001", "STDOUT"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        for _ in range(3):  # UDP: the first datagram may wait for ARP
            res = subprocess.run(guest_cmd(stack, "udpc", "10.78.0.33/24", "sh", "-c",
                                           "echo datagram | socat -u - UDP:10.78.0.1:7001"),
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
        out, _ = udp.communicate(timeout=15)
    finally:
        if udp.poll() is None:
            udp.kill()
            udp.communicate()
    assert "datagram" in out
    tcp = subprocess.Popen(["ip", "netns", "exec", ns, "socat", "-T", "10", "-u",
                            "TCP-LISTEN:7002,reuseaddr", "STDOUT"], stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, text=True)
    try:
        res = subprocess.run(guest_cmd(stack, "tcpu", "10.78.0.34/24", "sh", "-c",
                                       "echo stream | socat -T 5 -u - "
                                       "TCP:10.78.0.1:7002,retry=50,interval=0.2"),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        out, _ = tcp.communicate(timeout=15)
    finally:
        if tcp.poll() is None:
            tcp.kill()
            tcp.communicate()
    assert "stream" in out


def test_an_existing_interface_and_a_tap_serve_as_uplinks(stack: Stack) -> None:
    """nic add --interface: one end of a veth the test made, through AF_PACKET; the other
    end sits in a namespace of the test's own with 10.80.0.1. nic add --tap: a TAP whose
    host side gets 10.81.0.1 in another namespace."""
    import uuid

    tag = uuid.uuid4().hex[:6]
    ns, near, tap = f"iopt-ext-{tag}", f"ive{tag}", f"ivt{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", near, "type", "veth", "peer", "name", "far",
                        "netns", ns], check=True)
        subprocess.run(["ip", "link", "set", near, "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.80.0.1/24", "dev", "far"],
                       check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "far", "up"], check=True)
        stack.cli_json("nic", "add", "ext0", "--interface", near)
        stack.cli_json("nic", "add", "tap0", "--tap", tap)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the I/O partition picks NICs up each second
            ups = {n["name"]: n.get("uplink") for n in stack.cli_json("nic", "list")["nics"]}
            if ups.get("ext0") and ups.get("tap0"):
                break
            time.sleep(0.2)
        assert ups["ext0"]["kind"] == "packet" and ups["tap0"]["kind"] == "tap"
        res = subprocess.run([*IOPART, "guest", "run", "extg", *stack.sd(), "--netns", "--nic",
                              "ext0", "--ip", "10.80.0.2/24", "--", "ping", "-c", "2", "-W",
                              "2", "10.80.0.1"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "2 received" in res.stdout, res.stdout + res.stderr
        subprocess.run(["ip", "link", "set", tap, "netns", ns], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.81.0.1/24", "dev", tap], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", tap, "up"], check=True)
        res = subprocess.run([*IOPART, "guest", "run", "tapg", *stack.sd(), "--netns", "--nic",
                              "tap0", "--ip", "10.81.0.2/24", "--", "ping", "-c", "2", "-W",
                              "2", "10.81.0.1"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "2 received" in res.stdout, res.stdout + res.stderr
        stack.cli_json("nic", "remove", "ext0")
        stack.cli_json("nic", "remove", "tap0")
    finally:
        subprocess.run(["ip", "link", "del", near], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_iperf3_between_guests(stack: Stack, tmp_path: Path) -> None:
    server = subprocess.Popen(guest_cmd(stack, "ips", "10.78.0.41/24", "iperf3", "-s", "-1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        res = subprocess.run(guest_cmd(stack, "ipc", "10.78.0.42/24", "sh", "-c",
                                       "for i in 1 2 3 4 5; do iperf3 -J -t 2 -c 10.78.0.41 "
                                       "&& exit 0; sleep 0.5; done; exit 1"),
                             capture_output=True, text=True, timeout=90)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr
        doc = json.loads(res.stdout[res.stdout.index("{"):])
        bps = doc["end"]["sum_received"]["bits_per_second"]
        print(f"iperf3 guest to guest over iopart: {bps / 1e9:.2f} Gbit/s")
        assert bps > 10e6
    finally:
        server.kill()
        server.communicate(timeout=30)
    ports = stack.cli_json("nic", "list")
    assert ports["nics"][0]["uplink"]["kind"] == "veth"
    res = cli("nic", "add", "bad", *stack.sd(), "--interface", "nosuchif0")
    assert res.returncode == 0  # recorded; the I/O partition reports it unavailable
    stack.cli_json("nic", "remove", "bad")
