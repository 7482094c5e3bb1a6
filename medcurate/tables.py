"""The one CSV writer of every published table (scores, agreement, metrics, results).

``csv`` quotes what needs it (a test-set name with a comma, a model spec with a quote), which a
hand-joined line did not; fields without such characters come out exactly as ``str`` writes
them, so files of plain values are unchanged byte for byte.
"""

from __future__ import annotations

import csv
import io


def csv_bytes(header: list[str], rows: list[list]) -> bytes:
    """``header`` then ``rows`` as UTF-8 CSV, ``\\n`` line ends, None as an empty field."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return text.getvalue().encode("utf-8")


def records_csv(records: list[dict], header: list[str]) -> bytes:
    """``records`` (dicts) as CSV with the ``header`` columns, in that order."""
    return csv_bytes(header, [[record[h] for h in header] for record in records])
