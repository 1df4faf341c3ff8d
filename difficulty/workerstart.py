"""How the image stream's worker processes start, importable before anything heavy.

The decode workers (:mod:`difficulty.imagestream`) need torch; the process that reads
items and combines scores does not.  So the workers come from a fork server that imports
torch once, and a command that will decode images starts that server first thing
(:func:`start_workers_early`), before it imports its own libraries: the seconds torch
takes to import then overlap the command's start-up and its first reads.  This module
imports nothing but the standard library, so that calling it costs nothing.
"""

from __future__ import annotations

import multiprocessing
import sys
from typing import Any

WORKER_PRELOAD = ("torch", "difficulty.fourier")
"""Modules the fork server imports once, before it forks the workers."""


def worker_context() -> Any:
    """How worker processes start.

    When this process has loaded torch already, ``fork``: the workers share its pages.
    Otherwise a fork server that imports torch once (:data:`WORKER_PRELOAD`) and forks
    the workers from itself: torch is imported once, in parallel with this process's own
    work, and never in this process.  ``spawn`` where neither exists.
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and "torch" in sys.modules:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(WORKER_PRELOAD))
        return context
    return multiprocessing.get_context("spawn")


def start_workers_early(num_workers: int) -> None:
    """Start the fork server that the decode workers come from now, in its own process, so
    that its start-up (importing torch: seconds) overlaps this process's work before the
    first image is decoded.  Nothing to do for ``num_workers`` 0, or where the workers are
    forked from this process (see :func:`worker_context`)."""
    if num_workers > 0 and worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
