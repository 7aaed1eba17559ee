"""A WAN's delay and loss where the kernel has no sch_netem: a userspace Ethernet switch
between the hosts of a network test bed (consortium/netns.py).

    python -m consortium.wan_switch --delay-ms 40 --loss-percent 0.1 [--seed 0] PORT...

creates one TAP device per PORT name in the network namespace it runs in, prints
READY, and from then on forwards every Ethernet frame a port's host sends to the port
of the host it is addressed to (learning where each address is, as a bridge does;
broadcasts and addresses not yet seen go to every other port), `delay` after it arrived,
and drops each frame with probability `loss`: what `tc netem delay D loss L` on every
host's link does to its outgoing traffic, so a round trip between two hosts takes twice
the delay. The test bed moves each TAP device into its host's namespace as that host's
`eth0` (a TAP device keeps its queue to this process wherever it is moved) and limits
the rate there with `tc tbf`, which the kernel has.

A TAP device opened without IFF_VNET_HDR takes no offloaded (segmented-later) packets,
so every frame read is one Ethernet frame of at most the link's MTU, and is written out
as it came. The devices exist as long as this process: it ends, and they go, when its
standard input closes (the test bed closes it, or its owner died) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import select
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence

READY = "READY"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int), linux/if_tun.h
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # frames without tun's 4-byte packet-information header
MAX_FRAME = 65536  # far above any MTU: a read never truncates a frame
BROADCAST_BIT = 0x01  # in an Ethernet address's first octet: group (multicast) address
# Frames in flight at most (netem's `limit`, 1000 by default, per link): beyond it a
# frame is dropped, so a host sending faster than its link cannot grow this without end.
QUEUE_LIMIT = 10_000
# Addresses remembered at most; a host sending from ever new ones is flooded, not stored.
TABLE_LIMIT = 4096


def open_tap(name: str) -> int:
    """A new TAP device `name` in this network namespace, and the fd its frames cross."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    os.set_blocking(fd, False)
    return fd


class DelaySwitch:
    """Frames between port fds, each delivered `delay_s` late or (with `loss`) never."""

    def __init__(self, ports: Sequence[int], delay_s: float, loss: float, seed: int) -> None:
        if delay_s < 0 or not 0 <= loss < 1:
            raise ValueError(f"need delay >= 0 and 0 <= loss < 1, not {delay_s}, {loss}")
        self.ports = list(ports)
        self.delay_s = delay_s
        self.loss = loss
        self._random = random.Random(seed)
        self._where: dict[bytes, int] = {}  # Ethernet address -> the port it was seen on
        # One constant delay: frames fall due in the order they arrived.
        self._in_flight: deque[tuple[float, int, bytes]] = deque()
        self.forwarded = self.dropped = 0

    def arrive(self, port: int, frame: bytes, now: float) -> None:
        if len(frame) < 14:  # shorter than an Ethernet header: nothing to deliver
            return
        source = frame[6:12]
        if source in self._where or len(self._where) < TABLE_LIMIT:
            self._where[source] = port
        if len(self._in_flight) >= QUEUE_LIMIT or (self.loss and self._random.random() < self.loss):
            self.dropped += 1
            return
        self._in_flight.append((now + self.delay_s, port, frame))

    def due_in(self, now: float) -> float | None:
        """Seconds until the next frame is due; None when none is in flight."""
        return max(0.0, self._in_flight[0][0] - now) if self._in_flight else None

    def deliver_due(self, now: float) -> None:
        while self._in_flight and self._in_flight[0][0] <= now:
            _, source, frame = self._in_flight.popleft()
            for port in self.destinations(source, frame):
                try:
                    os.write(port, frame)
                except OSError:  # the host's link is down or its queue full: lost
                    self.dropped += 1
            self.forwarded += 1

    def destinations(self, source: int, frame: bytes) -> list[int]:
        target = self._where.get(frame[0:6])
        if frame[0] & BROADCAST_BIT or target is None:
            return [port for port in self.ports if port != source]
        return [] if target == source else [target]

    def run(self, stop_fd: int) -> None:
        """Forward until `stop_fd` is closed by its writer (or reaches its end)."""
        while True:
            now = time.monotonic()
            readable, _, _ = select.select([stop_fd, *self.ports], [], [], self.due_in(now))
            now = time.monotonic()
            for fd in readable:
                if fd == stop_fd:
                    if not os.read(stop_fd, 4096):
                        return
                    continue
                while True:
                    try:
                        frame = os.read(fd, MAX_FRAME)
                    except BlockingIOError:
                        break
                    self.arrive(fd, frame, now)
            self.deliver_due(now)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consortium.wan_switch")
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--loss-percent", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("ports", nargs="+", help="names of the TAP devices to create")
    args = parser.parse_args(argv)
    ports = [open_tap(name) for name in args.ports]
    switch = DelaySwitch(ports, args.delay_ms / 1000, args.loss_percent / 100, args.seed)
    print(READY, flush=True)
    switch.run(sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
