"""Who holds something: a process identity that can tell a live holder from a dead one.

Run journals, run records and project locks name their holder with :func:`current`:
``HOST:PID:START``, where ``START`` is the process start time in clock ticks since boot
(``/proc/PID/stat`` field 22; empty where ``/proc`` is missing).  The start time tells a
live holder from a new process that reuses its pid, e.g. pid 1 of a restarted container.

:meth:`Owner.is_dead` is certain only on the holder's own host: another host's process
cannot be seen, so there the caller falls back on a time-out.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass


def _start_ticks(pid: int) -> str:
    """Field 22 of ``/proc/PID/stat`` (start time in ticks), ``""`` when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return ""
    # the command name (field 2) is in parentheses and may hold spaces or ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True)
class Owner:
    """A process: host name, pid and start time (see the module docstring)."""

    host: str
    pid: int
    start: str = ""

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.start}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        """The owner written by ``str(owner)``; ``None`` for anything else."""
        host, _, rest = text.rpartition(":")
        host, _, pid = host.rpartition(":")
        if not host or not pid.isdigit():
            return None
        return cls(host=host, pid=int(pid), start=rest)

    def is_dead(self) -> bool:
        """True only when this is a process of this host that no longer runs."""
        if self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return bool(self.start) and self.start != _start_ticks(self.pid)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # it runs, as another user
        if self.start:
            now = _start_ticks(self.pid)
            return bool(now) and now != self.start
        return False


@functools.cache
def _this_process(pid: int) -> Owner:
    return Owner(host=socket.gethostname(), pid=pid, start=_start_ticks(pid))


def current() -> Owner:
    """This process (computed once per pid: a forked child gets its own)."""
    return _this_process(os.getpid())
