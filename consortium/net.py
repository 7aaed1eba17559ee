"""Address helpers: loopback checks and free ports for child servers."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable

from consortium.errors import ChildProcessFailedError

log = logging.getLogger(__name__)

# What uvicorn, the HTTP server of Flower's SuperLink and SuperNode, logs when another
# process holds the port it binds.
PORT_IN_USE = "address already in use"
# How often a child server is started on a newly chosen port when another process bound
# the chosen one first (`ready_on_a_free_port`).
PORT_TAKEN_ATTEMPTS = 3


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def is_wildcard_host(host: str) -> bool:
    """A bind host that means "every interface": not an address anyone can dial."""
    return host.strip("[]") in WILDCARD_HOSTS


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reserve_free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out for `host`, for a child that needs a number.

    The socket is closed before the child binds, so another process can take the port
    in between (on a busy host it does: a Ray head's GCS once found its port bound);
    `ready_on_a_free_port` starts the child again on another.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def ready_on_a_free_port(
    name: str,
    wait_ready: Callable[[], None],
    port_taken: Callable[[], bool],
    move_to: Callable[[int], None],
    choose_port: Callable[[], int] = reserve_free_port,
) -> None:
    """Wait for a child server on a port this process chose; while it failed because
    another process bound that port first, start it again on a newly chosen one
    (`move_to`), at most PORT_TAKEN_ATTEMPTS starts in all. Any other failure, or a port
    taken every time, raises as `wait_ready` did. Only for a port nobody asked for: a
    requested port that is taken is the operator's to free."""
    for attempt in range(1, PORT_TAKEN_ATTEMPTS + 1):
        try:
            wait_ready()
            return
        except ChildProcessFailedError:
            if attempt == PORT_TAKEN_ATTEMPTS or not port_taken():
                raise
        port = choose_port()
        log.warning(
            "another process bound the port chosen for the %s before it did; "
            "starting it on port %d",
            name,
            port,
        )
        move_to(port)


def local_address_towards(host: str, port: int) -> str:
    """This machine's address on the route to `host`: the one a peer there can dial back.

    A connected UDP socket sends nothing; the kernel only picks the route and source.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        address: str = sock.getsockname()[0]
        return address
