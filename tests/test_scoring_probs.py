"""Scoring with class probabilities the user brings (classification): the label map is
applied first, so the scorers see probabilities over project classes only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from _fileformat_helpers import png_bytes

from connectors.formats.base import PredictionSource
from connectors.formats.imagefolder import ImageFolderFormat
from connectors.labelmap import LabelMap
from connectors.model import Item, Prediction
from connectors.storage import ProjectFS
from difficulty.registry import SCORERS
from difficulty.scoring import score_project

# model classes: two become "cat", one becomes "dog", "car" is not a project class
LABEL_MAP = LabelMap(map={"kitten": "cat", "tabby": "cat", "puppy": "dog"})
PROBS = {
    "u0": {"kitten": 0.3, "tabby": 0.3, "puppy": 0.3, "car": 0.1},
    "u1": {"kitten": 0.05, "tabby": 0.05, "puppy": 0.5, "car": 0.4},
    "u2": {"kitten": 0.45, "tabby": 0.0, "puppy": 0.45, "car": 0.1},
}
PROJECT_PROBS = {  # over (cat, dog), the dropped "car" share taken out
    "u0": [0.6 / 0.9, 0.3 / 0.9],
    "u1": [0.1 / 0.6, 0.5 / 0.6],
    "u2": [0.5, 0.5],
}


class Probs(PredictionSource):
    def __init__(self, probs: dict[str, dict[str, float]]) -> None:
        self.probs = probs

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        name = item_id.rsplit("/", 1)[-1]
        return Prediction(item_id=item_id, probs=self.probs[name]) if name in self.probs else None

    def __iter__(self) -> Iterator[Prediction]:
        return (Prediction(item_id=f"_unlabeled/{k}", probs=v) for k, v in self.probs.items())


def test_brought_probabilities_are_label_mapped_before_scoring(tmp_path: Path) -> None:
    root = tmp_path / "project"
    for rel in ("cat/c0.png", "dog/d0.png", "_unlabeled/u0.png", "_unlabeled/u1.png",
                "_unlabeled/u2.png", "_unlabeled/u3.png"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes())
    fmt = ImageFolderFormat(ProjectFS(str(root)))
    scorers = ["fourier", "margin", "entropy", "least_confidence"]
    result = score_project(
        fmt, out_dir=str(tmp_path / "out"), predictions=Probs(PROBS), label_map=LABEL_MAP,
        scorers=scorers, num_workers=0,
    )  # fmt: skip
    table = result.table.set_index("item_id")
    ids = [f"_unlabeled/{k}" for k in PROJECT_PROBS]
    expected = np.array([PROJECT_PROBS[k] for k in PROJECT_PROBS])
    for name in scorers[1:]:
        want = SCORERS[name].fn(probs=expected)
        np.testing.assert_allclose(table.loc[ids, name].to_numpy(), want, err_msg=name)
        assert table.loc["_unlabeled/u3", name] != table.loc["_unlabeled/u3", name]  # NaN
    assert pd.notna(table.loc["_unlabeled/u3", "fourier"])
