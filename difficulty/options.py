"""Options objects: the settings of a library call as one validated value.

A command, the pipeline or a script builds one options object (from a config, from
command-line options) and hands it to the library function, instead of twenty keywords.
The functions also take the options' fields as keywords (a test, a notebook); the
keywords are laid over the object's values (:meth:`Options.of`).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

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
