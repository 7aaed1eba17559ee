"""Address helpers: loopback checks and free ports for child servers."""

from __future__ import annotations

import ipaddress
import socket


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

    The socket is closed before the child binds, so another process could in
    principle take the port in between; the child then fails to start and says so.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def local_address_towards(host: str, port: int) -> str:
    """This machine's address on the route to `host`: the one a peer there can dial back.

    A connected UDP socket sends nothing; the kernel only picks the route and source.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        address: str = sock.getsockname()[0]
        return address
