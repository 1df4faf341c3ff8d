"""Run ids: one format for every run (auto-label write-backs, scoring, scheduled runs).

``20260101T120000123456Z-1a2b3c``: the UTC start time to the microsecond, then six random
hex digits.  Ids compare as strings in the order they were made: within one process each
id's time is later than the previous id's (a clock that stands still or steps back is
moved on by a microsecond), so sorting run folders by name sorts them by start.
"""

from __future__ import annotations

import secrets
import threading
from datetime import datetime, timedelta, timezone

_lock = threading.Lock()
_last: datetime | None = None


def new_run_id(now: datetime | None = None) -> str:
    """A new, unique run id that sorts after every id this process made before."""
    global _last
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    with _lock:
        if _last is not None and now <= _last:
            now = _last + timedelta(microseconds=1)
        _last = now
    return f"{now.strftime('%Y%m%dT%H%M%S%f')}Z-{secrets.token_hex(3)}"
