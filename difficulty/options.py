"""Options objects: the settings of a library call as one validated value.

A command, the pipeline or a script builds one options object (from a config, from
command-line options) and hands it to the library function, instead of twenty keywords.
The functions also take the options' fields as keywords (a test, a notebook); the
keywords are laid over the object's values (:meth:`Options.of`).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from difficulty.tiers import TierConfig

OptionsT = TypeVar("OptionsT", bound="Options")


class Options(BaseModel):
    """Base of the options objects: unknown fields are an error; values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @classmethod
    def of(cls: type[OptionsT], options: OptionsT | None, keywords: dict[str, Any]) -> OptionsT:
        """``options`` (default: the defaults) with the fields in ``keywords`` replaced.

        A keyword that is no field of the options is a :class:`TypeError`, as for any
        function given an unexpected keyword.
        """
        unknown = sorted(set(keywords) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"{cls.__name__} has no option {', '.join(map(repr, unknown))}")
        if options is None:
            try:
                return cls(**keywords)
            except ValidationError as exc:
                missing = [e["loc"][0] for e in exc.errors() if e["type"] == "missing"]
                if missing:
                    raise TypeError(
                        f"{cls.__name__}: missing option {', '.join(map(repr, missing))}"
                    ) from exc
                raise
        return options.model_copy(update=keywords) if keywords else options


CHUNK_SIZE = 512
"""Items per chunk of a scoring run (one table part, one Dask task by default)."""


class ScoreOptions(Options):
    """The settings of a scoring run (:func:`difficulty.scoring.score_project`).

    ``scorers``: names (default: ``fourier`` plus what the inputs support); ``settings``:
    per-scorer settings under the scorer's name; ``tiers``: how tiers are cut (a reference
    run's thresholds win unless given); ``batch_size``/``num_workers``/``image_size``: image
    decoding; ``iou_threshold``/``error_min_score``: how the true error of a prediction is
    measured (``error_min_score`` default: a checkpoint's recorded box confidence, else
    0.25); ``min_labeled``: fewest labeled items to fit combination weights on;
    ``chunk_size``: items per chunk; ``seed``; ``signed_weights``: scorers that rank the
    true error backwards take part reversed (:func:`difficulty.combine.candidate_weights`).
    """

    scorers: list[str] | None = None
    settings: dict[str, dict[str, Any]] | None = None
    tiers: TierConfig = TierConfig()
    batch_size: int = 64
    num_workers: int = 2
    image_size: int = 128
    iou_threshold: float = 0.5
    error_min_score: float | None = None
    min_labeled: int = 30
    chunk_size: int = CHUNK_SIZE
    seed: int = 0
    signed_weights: bool = False
