"""Project formats, registered by name in :data:`FORMATS` (and prediction sources in
:data:`PREDICTION_FORMATS`) when this package is imported.

``labelstudio_api`` (a live Label Studio server: its project format, and the predictions
already stored there) is registered lazily: its module is imported only when a project or
predictions are opened from an ``http(s)://`` URL.  So is ``fiftyone`` (a FiftyOne dataset,
``fiftyone://NAME``), which needs the optional FiftyOne package.
"""

from __future__ import annotations

from connectors.formats import coco, imagefolder, kitti, labelstudio, manifest, voc, yolo
from connectors.formats.base import FORMATS, PREDICTION_FORMATS, PredictionSource, ProjectFormat

if "labelstudio_api" not in FORMATS:
    FORMATS.register_lazy(
        "labelstudio_api",
        "connectors.formats.labelstudio_api:LabelStudioAPI",
        hint="pip install 'labeltriage[labelstudio]'",
    )
if "labelstudio_api" not in PREDICTION_FORMATS:
    PREDICTION_FORMATS.register_lazy(
        "labelstudio_api",
        "connectors.formats.labelstudio_api:LabelStudioPredictions",
        hint="pip install 'labeltriage[labelstudio]'",
    )

FIFTYONE_HINT = "FiftyOne: pip install 'labeltriage[fiftyone]'"
if "fiftyone" not in FORMATS:
    FORMATS.register_lazy(
        "fiftyone", "connectors.formats.fiftyone.dataset:FiftyOneDataset", hint=FIFTYONE_HINT
    )
if "fiftyone" not in PREDICTION_FORMATS:
    PREDICTION_FORMATS.register_lazy(
        "fiftyone", "connectors.formats.fiftyone.dataset:FiftyOnePredictions", hint=FIFTYONE_HINT
    )

__all__ = [
    "FORMATS",
    "PREDICTION_FORMATS",
    "PredictionSource",
    "ProjectFormat",
    "coco",
    "imagefolder",
    "kitti",
    "labelstudio",
    "manifest",
    "voc",
    "yolo",
]
