"""Run ids: one format, unique, and in the order they were made (whatever the clock does)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autolabel.store
import connectors.runid
import connectors.writeback
import difficulty.scoring
from connectors.runid import new_run_id

RUN_ID = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{6}$")


@pytest.fixture(autouse=True)
def _fresh_clock() -> Iterator[None]:
    """Ids made with a made-up clock here must not move the ids of later tests."""
    saved = connectors.runid._last
    connectors.runid._last = None
    yield
    connectors.runid._last = saved


def test_every_run_kind_uses_the_one_function() -> None:
    assert connectors.writeback.new_run_id is new_run_id
    assert autolabel.store.new_run_id is new_run_id
    assert difficulty.scoring.new_run_id is new_run_id


def test_ids_made_in_a_row_sort_in_order() -> None:
    ids = [new_run_id() for _ in range(2000)]
    assert all(RUN_ID.match(i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-(10**7), max_value=10**7), min_size=2, max_size=30))
def test_ids_sort_in_the_order_made_even_when_the_clock_stalls_or_steps_back(
    steps_us: list[int],
) -> None:
    """Consecutive clock readings move by ``steps_us`` µs (0: the same reading; < 0: back)."""
    connectors.runid._last = None
    times, t = [], datetime(2026, 1, 1, tzinfo=timezone.utc)
    for step in steps_us:
        t = t + timedelta(microseconds=step)
        times.append(t)
    ids = [new_run_id(now) for now in times]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[0].startswith(times[0].strftime("%Y%m%dT%H%M%S%fZ-"))


def test_an_id_carries_its_utc_time() -> None:
    later = datetime(2099, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    assert new_run_id(later).startswith("20990506T070809123456Z-")
    local = later.astimezone(timezone(timedelta(hours=-5)))
    assert new_run_id(local).startswith("20990506T070809123457Z-")  # same instant: 1 µs on
