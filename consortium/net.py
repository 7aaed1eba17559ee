"""Address helpers: loopback checks and free ports for child servers."""

from __future__ import annotations

import ipaddress
import socket


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


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
