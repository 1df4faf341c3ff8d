"""CSV that a spreadsheet opens as data: cells that would start a formula are neutralised.

A text cell starting with ``=``, ``+``, ``-``, ``@`` (or a tab or carriage return) is
read by spreadsheet programs as a formula — an item id or annotator name taken from a
project could then run one ("CSV injection").  Every CSV file labeltriage writes goes
through :func:`csv_text`, which prefixes such cells with ``'`` (OWASP's advice); numbers
stay numbers (a negative number is not text).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: Any) -> Any:
    """``value`` itself, or ``'value`` when it is text that a spreadsheet reads as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_text(frame: pd.DataFrame, **to_csv: Any) -> str:
    """``frame.to_csv(index=False, **to_csv)`` with every text cell and header neutralised."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    safe = frame.copy()
    for column in safe.columns:
        if not (is_numeric_dtype(safe[column]) or is_bool_dtype(safe[column])):
            safe[column] = safe[column].map(neutralise)
    safe.columns = [neutralise(str(c)) for c in safe.columns]
    return str(safe.to_csv(index=False, **to_csv))
