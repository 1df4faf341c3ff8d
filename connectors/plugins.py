"""Extensions outside the package: modules that register formats, scorers or strategies.

A plugin is a plain Python module that registers what it adds when imported (a format
class with ``@FORMATS.register``, a scorer or query strategy with ``@register_scorer``).
It is imported the first time a registry is read, when it is named

* in the environment variable ``LABELTRIAGE_PLUGINS`` (module names, comma-separated), or
* as an entry point of the group ``labeltriage.plugins`` of an installed package
  (``[project.entry-points."labeltriage.plugins"] mine = "my_package.my_module"``).

A plugin that cannot be imported is an error naming it: a run never silently runs
without something it was told to use.
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib.metadata import entry_points

from connectors.errors import UsageError

log = logging.getLogger(__name__)

PLUGINS_ENV = "LABELTRIAGE_PLUGINS"
ENTRY_POINT_GROUP = "labeltriage.plugins"


def plugin_modules() -> list[str]:
    """The names of the plugin modules: the environment variable's, then the entry points'."""
    named = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    named += [ep.value.partition(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]
    return list(dict.fromkeys(named))


def load_plugins() -> None:
    """Import every plugin module (once; importing again is free)."""
    for name in plugin_modules():
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UsageError(f"plugin module {name!r} cannot be imported: {exc}") from exc
        log.debug("plugin %s loaded", name)
