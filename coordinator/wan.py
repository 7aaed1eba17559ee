"""Institutions behind WAN links, on one machine: `coordinator demo --wan` and
benchmarks/wan.py.

`run_behind_wan` builds a test bed (consortium/netns.py): the coordinator and each site
in a Linux network namespace of its own, with its own address, linked through a bridge,
every host's outgoing traffic shaped by `tc netem` (by default 40 ms of delay each way,
so 80 ms round trips, 100 Mbit/s and 0.1% loss). It then runs the given command inside
the coordinator's namespace, adding ``--wan-testbed TAG``; that command brings the
consortium up with `WanLayout`: `coordinator serve` binds the coordinator's test-bed
address (the control-plane API, the Fleet edge, the Ray head when asked for), whose
server certificate names it, and each site's `client join` runs in its own namespace
(`OwnChildren`'s namespaces), so everything between a site and the coordinator crosses
the emulated WAN and nothing passes through a loopback. The test bed is removed when
the command ends, also after a failure. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and
the `ip` command. On a kernel without the sch_netem module (the project's CI machines:
their kernels build only the htb, tbf and ingress qdiscs) the delay and loss come from a
userspace switch in place of the bridge (consortium/wan_switch.py) and the rate from
`tc tbf`; the command is told which (`describe_links`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from consortium.netns import IP, NetnsError, NetnsHost, NetworkTestbed, SwitchedLinks

WAN_NETEM = "delay 40ms rate 100mbit loss 0.1%"  # per direction: 80 ms round trips
WAN_RATE = "100mbit"  # WAN_NETEM's rate, where it has no rate of its own
COORDINATOR_HOST = "coordinator"
COORDINATOR_ADDRESS = "192.0.2.10"  # TEST-NET-1 (RFC 5737): never routed
FIRST_SITE_OCTET = 11
# netem's delay units, in milliseconds ("us" and "ms" before "s": they end with it)
DELAY_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
TESTBED_FLAG = "--wan-testbed"


@dataclass(frozen=True)
class WanLayout:
    """Who runs where on a test bed named `tag`: the coordinator and one host per site."""

    tag: str
    sites: tuple[str, ...]

    def hosts(self) -> list[NetnsHost]:
        coordinator = NetnsHost(COORDINATOR_HOST, COORDINATOR_ADDRESS)
        prefix = COORDINATOR_ADDRESS.rsplit(".", 1)[0]
        sites = [
            NetnsHost(name, f"{prefix}.{FIRST_SITE_OCTET + index}")
            for index, name in enumerate(self.sites)
        ]
        return [coordinator, *sites]

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"  # NetworkTestbed's naming

    def child_namespaces(self) -> dict[str, str]:
        """`client join` of each site (LocalConsortium names it client-<site>) in the
        site's namespace; everything else stays in the coordinator's."""
        return {f"client-{site}": self.namespace(site) for site in self.sites}

    def serve_flags(self, ray: bool) -> list[str]:
        """`coordinator serve` reachable on the coordinator's test-bed address alone."""
        flags = [
            "--listen-address",
            f"{COORDINATOR_ADDRESS}:0",
            "--fleet-edge-address",
            f"{COORDINATOR_ADDRESS}:0",
        ]
        return [*flags, "--ray-host", COORDINATOR_ADDRESS] if ray else flags


def testbed_tag() -> str:
    """A short, unique name prefix (namespace names are at most 15 bytes with a host's
    interface name rules in mind; this keeps `<tag>-<host>` readable)."""
    return f"wan{secrets.randbelow(100_000)}"  # not the pid: a crashed run's may recur


LINKS_ENV = "CONSORTIUM_WAN_LINKS"  # how the links are shaped, for the command to report


def run_behind_wan(
    sites: Sequence[str],
    argv: Sequence[str],
    netem: str = WAN_NETEM,
    on_links: Callable[[str], None] = lambda _: None,
) -> int:
    """Run `argv` (plus ``--wan-testbed TAG``) in the coordinator's namespace of a new test
    bed for `sites`; returns its exit code. The links get `netem`, or where the kernel
    has no netem only its rate; `on_links` hears which (so does the command, in
    ``CONSORTIUM_WAN_LINKS``). NetnsError when the test bed cannot be built."""
    layout = WanLayout(testbed_tag(), tuple(sites))
    links = f"tc netem {netem} on every host's link"
    try:
        testbed = NetworkTestbed(layout.hosts(), netem=netem, tag=layout.tag).__enter__()
    except NetnsError as error:
        if "sch_netem" not in str(error):
            raise
        rate = _netem_option(netem, "rate") or WAN_RATE
        switched = switched_links(netem)
        links = f"{switched.describe()}, tc tbf rate {rate} (this kernel has no sch_netem)"
        testbed = NetworkTestbed(
            layout.hosts(), tag=layout.tag, rate=rate, switched=switched
        ).__enter__()
    try:
        on_links(links)
        command = testbed.exec_argv(COORDINATOR_HOST, [*argv, TESTBED_FLAG, layout.tag])
        inner = subprocess.Popen(command, env={**os.environ, LINKS_ENV: links})
        try:
            return inner.wait()
        except BaseException:
            _let_it_stop(inner)
            raise
    finally:
        testbed.remove()


# How long the command inside gets to stop its consortium once interrupted (its
# children stop in parallel, each within its own timeout).
INNER_STOP_S = 60.0
# Ctrl-C reaches the command inside too (one process group): it is left this long to
# stop on its own before it is told to with SIGTERM.
INNER_SIGINT_S = 2.0


def _let_it_stop(inner: subprocess.Popen[bytes]) -> None:
    """Interrupted (Ctrl-C, or SIGTERM made KeyboardInterrupt): the command inside stops
    its consortium, and only then is the test bed removed. `subprocess.call` SIGKILLed
    it at once, which left its `coordinator serve`, sites and Ray running (in sessions
    of their own) in namespaces no longer listed."""
    try:
        inner.wait(INNER_SIGINT_S)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        inner.send_signal(signal.SIGTERM)
    try:
        inner.wait(INNER_STOP_S)
    except subprocess.TimeoutExpired:
        inner.kill()
        inner.wait()


def describe_links() -> str:
    """How this test bed's links are shaped (inside a `run_behind_wan` command)."""
    return os.environ.get(LINKS_ENV, f"tc netem {WAN_NETEM}")


def switched_links(netem: str) -> SwitchedLinks:
    """The delay and loss of a netem description ("delay 40ms ... loss 0.1%"), for the
    userspace switch that stands where the kernel has no sch_netem."""
    delay = _netem_option(netem, "delay") or "0ms"
    loss = _netem_option(netem, "loss") or "0%"
    unit = next((u for u in DELAY_UNITS_MS if delay.endswith(u)), None)
    try:
        if unit is None:
            raise ValueError(delay)
        delay_ms = float(delay.removesuffix(unit)) * DELAY_UNITS_MS[unit]
        loss_percent = float(loss.removesuffix("%"))
    except ValueError:
        raise NetnsError(f"cannot read the delay and loss of {netem!r}") from None
    return SwitchedLinks(delay_ms, loss_percent)


def _netem_option(netem: str, name: str) -> str | None:
    words = netem.split()
    return words[words.index(name) + 1] if name in words[:-1] else None


def interface_bytes(namespace: str) -> tuple[int, int]:
    """(received, sent) bytes over every interface of `namespace` but loopback: what
    crossed its link, protocol overhead included."""
    result = subprocess.run(
        [IP, "-n", namespace, "-s", "-j", "link", "show"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise NetnsError(f"cannot read {namespace}'s counters: {result.stderr.strip()}")
    received = sent = 0
    for link in json.loads(result.stdout):
        if link.get("ifname") == "lo":
            continue
        stats = link.get("stats64") or link.get("stats") or {}
        received += int(stats.get("rx", {}).get("bytes", 0))
        sent += int(stats.get("tx", {}).get("bytes", 0))
    return received, sent
