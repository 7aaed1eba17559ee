"""Several hosts on one machine: Linux network namespaces on one bridge (a test bed).

`NetworkTestbed([NetnsHost("coordinator", "192.0.2.10", ("coordinator.example.org",)),
...])` gives each host a network namespace of its own with one interface and its own
address, linked through a bridge that lives in a hub namespace of its own: the hosts
reach each other and nothing else (no route leaves the bridge, and the addresses are
TEST-NET-1, RFC 5737, which is never routed). Each host resolves every host's name and
aliases through `/etc/netns/<namespace>/hosts`, which `ip netns exec` mounts over
`/etc/hosts`. `netem` (for example ``"delay 40ms rate 100mbit loss 0.1%"``) shapes every
host's outgoing traffic with `tc netem`, so a round trip between two hosts sees twice the
delay: a WAN on one machine. Where the kernel has no sch_netem, `SwitchedLinks` gives the
same delay and loss from a userspace switch in place of the bridge
(consortium/wan_switch.py), each host's link a TAP device of that switch, and `rate`
limits every host's outgoing traffic with `tc tbf`.

Used by the multi-host tests and benchmarks; needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
Everything it creates is removed when the context ends, also after a failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from consortium.errors import ConsortiumError
from consortium.exit_codes import ExitCode

NETNS_ETC = Path("/etc/netns")
PREFIX_LENGTH = 24
IP = "ip"


class NetnsError(ConsortiumError, RuntimeError):
    """The test bed could not be built (not root, no `ip`, or a command failed)."""

    exit_code = ExitCode.CHILD_PROCESS_FAILED  # `ip` or `tc` refused, or could not run


@dataclass(frozen=True)
class NetnsHost:
    name: str  # also its host name on the test bed
    address: str  # IPv4, in the test bed's /24
    aliases: tuple[str, ...] = ()  # more names that resolve to it (e.g. a DNS name)


@dataclass(frozen=True)
class SwitchedLinks:
    """Delay and loss on every host's outgoing traffic, from consortium/wan_switch.py."""

    delay_ms: float
    loss_percent: float = 0.0
    seed: int = 0

    def describe(self) -> str:
        return (
            f"delay {self.delay_ms:g} ms and loss {self.loss_percent:g}% on every host's "
            "outgoing traffic from a userspace switch (consortium/wan_switch.py)"
        )


SWITCH_START_TIMEOUT_S = 30.0


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


class NetworkTestbed:
    """Hosts in namespaces named `<tag>-<host>`; `exec_argv(host, argv)` runs in one."""

    def __init__(
        self,
        hosts: Sequence[NetnsHost],
        netem: str | None = None,
        tag: str | None = None,
        rate: str | None = None,
        switched: SwitchedLinks | None = None,
    ) -> None:
        """``rate`` (e.g. ``"100mbit"``), without ``netem``: a rate limit on every host's
        outgoing traffic (`tc tbf`), for kernels without sch_netem; ``switched`` adds
        delay and loss there."""
        if netem and switched:
            raise NetnsError("netem and switched links are two ways to one end: pick one")
        if os.geteuid() != 0:
            raise NetnsError("network namespaces need root")
        if shutil.which(IP) is None:
            raise NetnsError("`ip` (iproute2) is not installed")
        networks = {ipaddress.ip_interface(f"{h.address}/{PREFIX_LENGTH}").network for h in hosts}
        if len(networks) != 1:
            raise NetnsError(f"every host must be in one /{PREFIX_LENGTH}: {sorted(networks)}")
        self.hosts = {host.name: host for host in hosts}
        self.netem = netem
        self.rate = rate
        self.switched = switched
        self._switch: subprocess.Popen[str] | None = None
        self.tag = tag or f"cons{os.getpid()}"
        self.hub = f"{self.tag}-hub"
        self._created: list[str] = []
        self._made_etc_dirs: list[Path] = []  # /etc/netns/<ns>, made by this test bed
        self._made_etc = not NETNS_ETC.exists()

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside `host`'s namespace (its network, its /etc/hosts)."""
        return [IP, "netns", "exec", self.namespace(host), *argv]

    def __enter__(self) -> NetworkTestbed:
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def _add_namespace(self, name: str) -> None:
        if (
            name
            in subprocess.run(
                [IP, "netns", "list"], capture_output=True, text=True, check=False
            ).stdout.split()
        ):
            raise NetnsError(
                f"network namespace {name} exists already (left by an earlier run?): "
                f"`ip netns delete {name}` if nothing uses it, and start again"
            )
        _run(IP, "netns", "add", name)
        self._created.append(name)
        _run(IP, "-n", name, "link", "set", "lo", "up")

    def _create(self) -> None:
        self._add_namespace(self.hub)
        ports = [f"p{index}" for index in range(len(self.hosts))]  # in the hub
        if self.switched:
            self._start_switch(ports)
        else:
            _run(IP, "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _run(IP, "-n", self.hub, "link", "set", "br0", "up")
        for port, host in zip(ports, self.hosts.values(), strict=True):
            ns = self.namespace(host.name)
            self._add_namespace(ns)
            if self.switched:
                # The switch's TAP device becomes the host's link.
                _run(IP, "-n", self.hub, "link", "set", port, "netns", ns)
                _run(IP, "-n", ns, "link", "set", port, "name", "eth0")
            else:
                # Both ends made in their namespaces: a peer made here first, in the
                # machine's own namespace, collided with an interface of that name
                # (another test bed's, a NIC's) and failed with no hint.
                _run(IP, "link", "add", "eth0", "netns", ns, "type", "veth",
                     "peer", "name", port, "netns", self.hub)  # fmt: skip
                _run(IP, "-n", self.hub, "link", "set", port, "master", "br0")
                _run(IP, "-n", self.hub, "link", "set", port, "up")
            _run(IP, "-n", ns, "addr", "add", f"{host.address}/{PREFIX_LENGTH}", "dev", "eth0")
            _run(IP, "-n", ns, "link", "set", "eth0", "up")
            if self.netem:
                self._shape(ns)
            elif self.rate:
                _run(IP, "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root",
                     "tbf", "rate", self.rate, "burst", "64kb", "latency", "400ms")  # fmt: skip
            # Made here, never taken over: `ip netns exec` binds whatever files the dir
            # holds (a resolv.conf of another's) over the namespace's /etc, and `remove`
            # deletes it.
            etc = NETNS_ETC / ns
            NETNS_ETC.mkdir(parents=True, exist_ok=True)
            try:
                etc.mkdir()
            except FileExistsError:
                raise NetnsError(
                    f"{etc} exists already (left by an earlier run?): remove it, and the "
                    f"namespace {ns} if it is listed by `ip netns list`"
                ) from None
            self._made_etc_dirs.append(etc)
            (etc / "hosts").write_text(self._hosts_file(host))

    def _start_switch(self, ports: Sequence[str]) -> None:
        """consortium/wan_switch.py in the hub, its TAP devices named `ports`; it ends
        when its standard input closes (`remove`, or this process's death)."""
        assert self.switched is not None
        links = self.switched
        # -P: as root, never a module of the current dir (`-m` would put it first).
        argv = [sys.executable, "-P", "-m", "consortium.wan_switch",
                "--delay-ms", str(links.delay_ms),
                "--loss-percent", str(links.loss_percent), "--seed", str(links.seed)]  # fmt: skip
        self._switch = subprocess.Popen(
            [IP, "netns", "exec", self.hub, *argv, *ports],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._switch.stdout is not None
        ready, _, _ = select.select([self._switch.stdout], [], [], SWITCH_START_TIMEOUT_S)
        if not ready or self._switch.stdout.readline().strip() != "READY":
            errors = self._stop_switch()
            raise NetnsError(f"the WAN switch did not start: {errors.strip()[-2000:]}")

    def _stop_switch(self) -> str:
        """Close the switch's input, so it ends (killed after 5 s); what it wrote to its
        standard error."""
        switch, self._switch = self._switch, None
        if switch is None:
            return ""
        try:
            _, errors = switch.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            switch.kill()
            _, errors = switch.communicate()
        return errors or ""

    def _shape(self, ns: str) -> None:
        try:
            _run(IP, "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root",
                 "netem", *(self.netem or "").split())  # fmt: skip
        except NetnsError as err:
            raise NetnsError(
                f"{err} (this kernel may lack the sch_netem module: tc netem is unavailable)"
            ) from None

    def _hosts_file(self, own: NetnsHost) -> str:
        """Every host's names; the machine's own host name (shared by the namespaces)
        resolves to this host's address, as it would on a host of its own."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        for host in self.hosts.values():
            names = (host.name, *host.aliases, *((socket.gethostname(),) if host is own else ()))
            lines.append(f"{host.address} {' '.join(names)}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _kill_processes_in(name: str) -> None:
        listed = subprocess.run(
            [IP, "netns", "pids", name], capture_output=True, text=True, check=False
        )
        for pid in (int(word) for word in listed.stdout.split() if word.isdigit()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Delete every namespace this test bed created (their links go with them), ending
        first whatever still runs in one: `ip netns delete` only unmounts a namespace,
        which lives on, unlisted, while a process is in it."""
        self._stop_switch()
        for name in reversed(self._created):
            self._kill_processes_in(name)
            subprocess.run([IP, "netns", "delete", name], capture_output=True, check=False)
        for etc in self._made_etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)
        self._made_etc_dirs.clear()
        self._created.clear()
        if self._made_etc:
            with contextlib.suppress(OSError):  # another test bed may still use it
                NETNS_ETC.rmdir()
