"""The network-namespace test bed (consortium/netns.py) and the guide's annotations
(tests/guide.py) that the multi-host test runs."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from consortium.netns import NetnsError, NetnsHost, NetworkTestbed, SwitchedLinks
from consortium.processes import pid_alive
from coordinator.wan import interface_bytes, run_behind_wan, switched_links
from tests.guide import GUIDE, GuideError, RunStep, SendStep, for_site, read_steps

HOSTS = [
    NetnsHost("server", "192.0.2.10", ("server.example.org",)),
    NetnsHost("site", "192.0.2.21"),
]
ECHO_SERVER = """
import socket
with socket.create_server(("192.0.2.10", 7000)) as server:
    print("listening", flush=True)
    connection, peer = server.accept()
    connection.sendall(peer[0].encode())
"""
CONNECT = """
import socket, sys
with socket.create_connection((sys.argv[1], 7000), timeout=5) as connection:
    print(connection.recv(100).decode())
"""


def _namespaces() -> str:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return listed.stdout


def _connect_from_site(bed: NetworkTestbed, target: str) -> subprocess.CompletedProcess[str]:
    argv = bed.exec_argv("site", [sys.executable, "-c", CONNECT, target])
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def _server(bed: NetworkTestbed, script: str) -> Iterator[subprocess.Popen[str]]:
    """`script` on the "server" host, once it printed "listening", until the block ends."""
    server = subprocess.Popen(
        bed.exec_argv("server", [sys.executable, "-c", script]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == "listening\n"
        yield server
    finally:
        server.kill()
        server.communicate()  # reaps it and closes its pipe


@contextlib.contextmanager
def _echo_server(bed: NetworkTestbed) -> Iterator[None]:
    """ECHO_SERVER on the "server" host, listening until the block ends."""
    with _server(bed, ECHO_SERVER):
        yield


def _link_qdisc(bed: NetworkTestbed, host: str) -> str:
    """What `tc` shows on `host`'s link."""
    return subprocess.run(
        bed.exec_argv(host, ["tc", "qdisc", "show", "dev", "eth0"]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_hosts_reach_each_other_by_name_and_nothing_beyond_the_bridge() -> None:
    with NetworkTestbed(HOSTS, tag="tbtest") as bed:
        assert "tbtest-server" in _namespaces()
        with _echo_server(bed):
            reached = _connect_from_site(bed, "server.example.org")
            # The server saw the site's own address, not loopback.
            assert reached.stdout.strip() == "192.0.2.21", reached.stderr
        outside = _connect_from_site(bed, "198.51.100.1")
        assert outside.returncode != 0 and "unreachable" in outside.stderr
    assert "tbtest" not in _namespaces()


def test_the_test_bed_is_removed_after_a_failure_inside_it() -> None:
    with pytest.raises(RuntimeError, match="boom"), NetworkTestbed(HOSTS, tag="tbfail"):
        raise RuntimeError("boom")
    assert "tbfail" not in _namespaces()


def test_hosts_on_different_networks_are_refused() -> None:
    with pytest.raises(NetnsError, match="one /24"):
        NetworkTestbed([NetnsHost("a", "192.0.2.1"), NetnsHost("b", "198.51.100.1")])


def test_the_guide_reads_as_steps_on_named_hosts() -> None:
    steps = read_steps(GUIDE.read_text())
    runs = [step for step in steps if isinstance(step, RunStep)]
    assert runs[0].script.startswith("coordinator init") and runs[0].host == "operator"
    assert [s.script.split()[:2] for s in runs if s.background] == [
        ["coordinator", "serve"],
        ["client", "join"],
    ]
    sends = [step for step in steps if isinstance(step, SendStep)]
    assert [(s.source_host, s.target_host) for s in sends] == [
        ("site", "operator"),
        ("operator", "site"),
    ]
    revoke = next(s for s in runs if "revoke" in s.script)
    assert revoke.first_site_only and revoke.script.startswith("coordinator revoke")


def test_a_step_for_another_site_names_that_site_only() -> None:
    command = "coordinator onboard st-olaf-hospital --out ./bundle-st-olaf"
    assert for_site(command, "mercy") == "coordinator onboard mercy --out ./bundle-mercy"
    assert for_site(command, "st-olaf-hospital") == (
        "coordinator onboard st-olaf-hospital --out ./bundle-st-olaf-hospital"
    )


def test_an_unknown_annotation_flag_is_an_error() -> None:
    with pytest.raises(GuideError, match="line 1: unknown flag"):
        read_steps("<!-- on: operator, twice -->\n```bash\nls\n```\n")


def test_a_rate_limited_test_bed_shapes_every_link_and_counts_what_crosses_it() -> None:
    """A rate alone (no delay or loss): tc tbf on every host's link, through the bridge;
    `interface_bytes` counts the bytes a connection moved."""
    with NetworkTestbed(HOSTS, tag="tbrate", rate="100mbit") as bed:
        for host in ("server", "site"):
            shown = _link_qdisc(bed, host)
            assert "tbf" in shown and "100Mbit" in shown, shown
        with _echo_server(bed):
            received_before, sent_before = interface_bytes(bed.namespace("site"))
            assert _connect_from_site(bed, "192.0.2.10").stdout.strip() == "192.0.2.21"
            received, sent = interface_bytes(bed.namespace("site"))
        # A TCP handshake, the 10-byte answer and the close: well over 100 bytes each way.
        assert received - received_before > 100 and sent - sent_before > 100


def test_a_command_behind_the_wan_runs_in_the_coordinators_namespace_told_its_links(
    tmp_path: Path,
) -> None:
    """`coordinator demo --wan` and benchmarks/wan.py run themselves again this way; the
    test bed is gone when the command ends."""
    said = tmp_path / "said.txt"
    script = (
        "import os, pathlib, socket, sys\n"
        "socket.create_server(('192.0.2.10', 0)).close()  # only on the coordinator's host\n"
        f"pathlib.Path({str(said)!r}).write_text("
        "sys.argv[-1] + '\\n' + os.environ['CONSORTIUM_WAN_LINKS'])\n"
    )
    heard: list[str] = []
    code = run_behind_wan(["site-a"], [sys.executable, "-c", script], on_links=heard.append)
    assert code == 0
    tag, links = said.read_text().split("\n")
    assert heard == [links]
    assert links.startswith("tc netem delay 40ms") or (
        "delay 40 ms and loss 0.1%" in links and "tc tbf rate 100mbit" in links
    ), links
    assert f"{tag}-coordinator" not in _namespaces() and f"{tag}-site-a" not in _namespaces()


# On the site: three round trips through the server's echo, the shortest printed; then
# DATAGRAMS numbered UDP datagrams to its port 7001.
DATAGRAMS = 300
ROUND_TRIPS_AND_DATAGRAMS = f"""
import socket, time
for attempt in range(5):  # a lost ARP request or SYN can fail a connect: as on a WAN
    try:
        connection = socket.create_connection(("192.0.2.10", 7000), timeout=30)
        break
    except OSError:
        time.sleep(0.5)
with connection:
    times = []
    for _ in range(3):
        started = time.monotonic()
        connection.sendall(b"x")
        connection.recv(1)
        times.append(time.monotonic() - started)
print(min(times))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
    for number in range({DATAGRAMS}):
        udp.sendto(str(number).encode(), ("192.0.2.10", 7001))
        time.sleep(0.001)
"""
# On the server: echo one connection's bytes, then count the datagrams that arrive
# until none has for a second.
ECHO_AND_COUNT = """
import socket
with socket.create_server(("192.0.2.10", 7000)) as server, socket.socket(
    socket.AF_INET, socket.SOCK_DGRAM
) as udp:
    udp.bind(("192.0.2.10", 7001))
    print("listening", flush=True)
    connection, _ = server.accept()
    while data := connection.recv(100):
        connection.sendall(data)
    udp.settimeout(1.0)
    received = 0
    try:
        while True:
            udp.recv(100)
            received += 1
    except TimeoutError:
        print(received, flush=True)
"""


def test_switched_links_delay_every_frame_and_drop_the_seeded_share() -> None:
    """Where the kernel has no sch_netem (as on CI's), the WAN's delay and loss come from
    the userspace switch: each direction is delayed by its 40 ms (a round trip takes at
    least 80 ms), 10% loss drops about a tenth of the datagrams, and the switch is gone
    with the test bed."""
    links = SwitchedLinks(delay_ms=40, loss_percent=10, seed=7)
    with NetworkTestbed(HOSTS, tag="tbswitch", rate="100mbit", switched=links) as bed:
        shown = _link_qdisc(bed, "site")
        assert "tbf" in shown and "100Mbit" in shown, shown
        with _server(bed, ECHO_AND_COUNT) as server:
            site = subprocess.run(
                bed.exec_argv("site", [sys.executable, "-c", ROUND_TRIPS_AND_DATAGRAMS]),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert site.returncode == 0, site.stderr
            assert server.stdout is not None
            received = int(server.stdout.readline())  # printed once the datagrams stop
        switch = [
            child
            for child in psutil.Process().children(recursive=True)
            if "consortium.wan_switch" in " ".join(child.cmdline())
        ]
        assert len(switch) == 1
    assert float(site.stdout) >= 0.080
    # 300 datagrams at 10% loss: 270 expected, sd 5; the seed makes it repeatable.
    assert 0.8 * DATAGRAMS < received < 0.98 * DATAGRAMS, received
    assert "tbswitch" not in _namespaces()
    assert not switch[0].is_running()


def test_a_netem_description_gives_the_switch_its_delay_and_loss() -> None:
    assert switched_links("delay 40ms rate 100mbit loss 0.1%") == SwitchedLinks(40.0, 0.1)
    assert switched_links("delay 1s") == SwitchedLinks(1000.0, 0.0)
    with pytest.raises(NetnsError, match="cannot read the delay"):
        switched_links("delay 40")  # netem wants a unit


INNER_UNTIL_TOLD = """
import pathlib, signal, subprocess, sys, time
left = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a child of its own
pathlib.Path(sys.argv[2]).write_text(str(left.pid))
def stop(signum, frame):
    pathlib.Path(sys.argv[1]).write_text("stopped its consortium")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
time.sleep(300)
"""
OUTER_AS_THE_CLI = """
import signal, sys
from coordinator.wan import run_behind_wan
def interrupted(signum, frame):
    raise KeyboardInterrupt  # as `coordinator demo --wan` and benchmarks/wan.py do
signal.signal(signal.SIGTERM, interrupted)
try:
    run_behind_wan(["site-a"], [sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_an_interrupted_command_behind_the_wan_stops_its_own_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """SIGTERM to `coordinator demo --wan`: the command inside the test bed is let stop
    its consortium (it was SIGKILLed, and its children, in sessions of their own, ran
    on in namespaces no longer listed), and what still runs in a namespace ends with it."""
    stopped, left_pid = tmp_path / "stopped", tmp_path / "left.pid"
    outer = subprocess.Popen(
        [sys.executable, "-c", OUTER_AS_THE_CLI, INNER_UNTIL_TOLD, str(stopped), str(left_pid)]
    )
    try:
        deadline = time.monotonic() + 60
        while not left_pid.exists() or not left_pid.read_text():
            assert outer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        left = int(left_pid.read_text())
        outer.terminate()
        assert outer.wait(timeout=90) == 130
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()
    assert stopped.read_text() == "stopped its consortium"
    assert not pid_alive(left)


def test_an_etc_dir_or_namespace_an_earlier_run_left_is_refused_and_left_alone() -> None:
    """`ip netns exec` binds what /etc/netns/<ns> holds over the namespace's /etc (a
    resolv.conf of another's was used), and removing the test bed deleted that dir."""
    left = Path("/etc/netns/tbleft-server")
    left.mkdir(parents=True)
    (left / "resolv.conf").write_text("nameserver 203.0.113.53\n")
    try:
        with pytest.raises(NetnsError, match="exists already"), NetworkTestbed(HOSTS, tag="tbleft"):
            pass
        assert (left / "resolv.conf").read_text() == "nameserver 203.0.113.53\n"
        assert "tbleft-" not in _namespaces()  # what it had made, removed
    finally:
        shutil.rmtree(left)
    subprocess.run(["ip", "netns", "add", "tbleft2-hub"], check=True)
    try:
        with (
            pytest.raises(NetnsError, match="ip netns delete tbleft2-hub"),
            NetworkTestbed(HOSTS, tag="tbleft2"),
        ):
            pass
        assert "tbleft2-hub" in _namespaces()  # not another's to delete
    finally:
        subprocess.run(["ip", "netns", "delete", "tbleft2-hub"], check=False)
