"""Label Studio as labeltriage sees it, one module per idea.

* :mod:`connectors.labelstudio.regions` — result regions ↔ :class:`~connectors.model.Annotation`
  and a task's label (one converter, used by the export-file format, the live project and
  the ML backend);
* :mod:`connectors.labelstudio.provenance` — how labeltriage marks what it stores in a
  project (``model_version`` ``labeltriage-<version>/<run_id>``, region ``meta``) and
  recognises it again;
* :mod:`connectors.labelstudio.config` — the parts of a project's XML label config
  labeltriage needs (parsed by ``label-studio-sdk``);
* :mod:`connectors.labelstudio.client` — the REST client (``label-studio-sdk``) plus what
  the SDK lacks: the image fetch with its source policy.

The formats themselves are :mod:`connectors.formats.labelstudio` (an export file) and
:mod:`connectors.formats.labelstudio_api` (a live project).  Nothing here imports the SDK
at module level: it is imported when a live project is opened.
"""
