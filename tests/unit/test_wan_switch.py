"""consortium/wan_switch.py's forwarding, on pipes: each frame goes where its destination
was last seen (everywhere else while unknown, and when broadcast), never back to where it
came from, and only once its delay has passed; the seeded loss drops a repeatable share.
The switch on real TAP devices between network namespaces: tests/unit/test_netns.py."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from consortium.wan_switch import QUEUE_LIMIT, TABLE_LIMIT, DelaySwitch

A, B, C = (bytes([0x02, 0, 0, 0, 0, n]) for n in (1, 2, 3))
BROADCAST = b"\xff" * 6


def frame(destination: bytes, source: bytes, payload: bytes = b"hello") -> bytes:
    return destination + source + b"\x08\x00" + payload


@pytest.fixture
def pipes() -> Iterator[list[tuple[int, int]]]:
    """Three (read, write) pipes: the switch writes to a port; the test reads there."""
    made = [os.pipe() for _ in range(3)]
    for read, _ in made:
        os.set_blocking(read, False)
    yield made
    for read, write in made:
        os.close(read)
        os.close(write)


def received(pipe: tuple[int, int]) -> bytes:
    try:
        return os.read(pipe[0], 65536)
    except BlockingIOError:
        return b""


def test_frames_wait_their_delay_then_go_where_their_destination_was_seen(
    pipes: list[tuple[int, int]],
) -> None:
    ports = [write for _, write in pipes]
    switch = DelaySwitch(ports, delay_s=0.04, loss=0.0, seed=0)
    hello = frame(BROADCAST, A)
    switch.arrive(ports[0], hello, now=10.0)
    assert switch.due_in(10.0) == pytest.approx(0.04)
    switch.deliver_due(10.039)
    assert [received(p) for p in pipes] == [b"", b"", b""]  # not yet
    switch.deliver_due(10.04)
    assert [received(p) for p in pipes] == [b"", hello, hello]  # not back to A's port
    answer = frame(A, B)
    switch.arrive(ports[1], answer, now=10.1)
    switch.deliver_due(10.2)
    assert [received(p) for p in pipes] == [answer, b"", b""]  # A was learned
    unknown = frame(C, A)
    switch.arrive(ports[0], unknown, now=10.3)
    switch.deliver_due(10.4)
    assert [received(p) for p in pipes] == [b"", unknown, unknown]  # C not seen yet
    assert switch.due_in(10.4) is None
    assert (switch.forwarded, switch.dropped) == (3, 0)


def test_the_seeded_loss_drops_a_repeatable_share(pipes: list[tuple[int, int]]) -> None:
    ports = [write for _, write in pipes]

    def dropped(seed: int) -> int:
        switch = DelaySwitch(ports, delay_s=0.0, loss=0.25, seed=seed)
        for _ in range(400):
            switch.arrive(ports[0], frame(B, A), now=0.0)
            switch.deliver_due(0.0)
            received(pipes[1])
        return switch.dropped

    assert dropped(3) == dropped(3)
    assert 60 < dropped(3) < 140  # 100 expected, sd 9


def test_a_full_table_floods_new_addresses_and_a_full_queue_drops(
    pipes: list[tuple[int, int]],
) -> None:
    ports = [write for _, write in pipes]
    switch = DelaySwitch(ports, delay_s=1.0, loss=0.0, seed=0)
    for n in range(TABLE_LIMIT):  # a host sending from ever new addresses
        switch.arrive(ports[0], frame(A, n.to_bytes(6, "big")), now=0.0)
    switch.arrive(ports[1], frame(A, B), now=0.0)
    assert switch.destinations(ports[2], frame(B, C)) == [ports[0], ports[1]]  # not learned
    assert switch.dropped == 0
    for _ in range(QUEUE_LIMIT - TABLE_LIMIT - 1 + 5):
        switch.arrive(ports[2], frame(A, C), now=0.0)
    assert switch.dropped == 5


def test_impossible_settings_are_refused(pipes: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError, match="loss < 1"):
        DelaySwitch([pipes[0][1]], delay_s=0.04, loss=1.0, seed=0)
