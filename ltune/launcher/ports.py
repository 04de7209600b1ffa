"""TCP port checks for the rendezvous (master) port."""

from __future__ import annotations

import socket


def port_in_use(port: int, host: str = "") -> bool:
    """True when nothing may listen on ``port`` here: a test bind on all interfaces fails.

    SO_REUSEADDR is set as torch's TCPStore sets it, so a port left in TIME_WAIT by an
    earlier run does not count as taken; a live listener does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A port the kernel says is free now (there is a small race until the job binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
