"""Telling systemd how the daemon is doing (sd_notify, for a `Type=notify` unit).

systemd passes the path of a Unix datagram socket in `$NOTIFY_SOCKET` (a leading `@`
names one in the abstract namespace); one datagram of `KEY=VALUE` lines is the whole
protocol. A few lines of `socket`, so rpfs needs no libsystemd binding: `READY=1` once
the mount answers (so units ordered after `rpfs@...service` find the images there),
`STOPPING=1` when it begins to unmount. Outside systemd the variable is unset and this
does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def notify(state: str) -> None:
    """Send `state` (e.g. "READY=1") to systemd, if it asked; a failure is logged, never
    raised: the mount serves whether or not its supervisor heard."""
    path = os.environ.get(ENV, "")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot tell systemd %s at %s: %s", state, path, exc)
