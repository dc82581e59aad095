"""sd_notify without libsystemd: one datagram per state change to $NOTIFY_SOCKET (if set).

Also the two facts systemd passes in the environment: the watchdog period (WATCHDOG_USEC, meant for
us only when WATCHDOG_PID is unset or our pid) and the CLOCK_MONOTONIC stamp that RELOADING=1 carries.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("kvtierd")


def sd_notify(state: str) -> bool:
    """Sends `state` (newline-separated VAR=value lines); False when there is no socket or it failed.

    A notify socket that went away must not take the daemon down, so send errors are only logged.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("sd_notify(%r) failed: %s", state, exc)
        return False
    return True


def watchdog_period_s() -> float | None:
    """The watchdog period systemd set for this process (WatchdogSec=), or None when there is none."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # inherited from a parent: not ours to ping
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as MONOTONIC_USEC= wants it with RELOADING=1 (systemd >= 253)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
