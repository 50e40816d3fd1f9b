"""Writing an :class:`~mimcore.evaluation.metrics.Evaluation`: CSV, JSON (both atomic) and a
terminal table.

* CSV: one row per case x class, columns ``case_id`` + ``ROW_FIELDS`` + the two file paths;
  an undefined metric (``None``) is an empty cell, never ``nan``.
* JSON: ``{"labels", "cases": [{"case_id", "prediction", "reference", "classes": [...]}],
  "summary": [...], "notes"}``; undefined metrics are ``null`` (the file is strict JSON).
* :func:`format_summary` : per class, Dice and HD95 mean ± std with the number of cases
  each is over, and how many cases were missing / false positive / absent.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from mimcore.errors import MimError
from mimcore.evaluation.metrics import ROW_FIELDS, Evaluation
from mimcore.files import atomic_write_text

CSV_FIELDS = ("case_id", *ROW_FIELDS, "prediction", "reference")


def _write(path: str | os.PathLike, text: str) -> Path:
    """Write a report atomically and verified (a full disk is an OutputError, exit 2, with
    nothing left at ``path``)."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MimError(f"Could not create the folder {path.parent}: {err.strerror or err}. Check that it "
                       "is writable and the disk is not full.") from None
    return atomic_write_text(path, text, what="report")


def csv_text(evaluation: Evaluation) -> str:
    """The CSV (header + one line per case x class) as text."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for case in evaluation.cases:
        for row in case.rows:
            line = {"case_id": case.case_id, "prediction": case.prediction, "reference": case.reference}
            line.update({key: ("" if row[key] is None else row[key]) for key in ROW_FIELDS})
            writer.writerow(line)
    return out.getvalue()


def write_csv(path: str | os.PathLike, evaluation: Evaluation) -> Path:
    """Write the per case x class CSV atomically; returns the path."""
    return _write(path, csv_text(evaluation))


def write_json(path: str | os.PathLike, evaluation: Evaluation) -> Path:
    """Write labels, per-case rows, summary and notes as strict JSON, atomically; returns the path."""
    return _write(path, json.dumps(evaluation.to_dict(), indent=2, allow_nan=False) + "\n")


def _mean_std(stats: dict, digits: int) -> str:
    if not stats["n"]:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} ({stats['n']})"


def format_summary(evaluation: Evaluation) -> str:
    """A fixed-width table of the per-class summary, for the terminal."""
    header = ("label", "cases", "Dice mean ± std (n)", "HD95 mm mean ± std (n)", "missing", "false+", "absent")
    lines = []
    for item in evaluation.summary:
        counts = item["status_counts"]
        lines.append((f"{item['value']} {item['name']}", str(item["cases"]), _mean_std(item["dice"], 4),
                      _mean_std(item["hd95_mm"], 2), str(counts["missing_in_prediction"]),
                      str(counts["false_positive"]), str(counts["absent_in_both"])))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    table = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(row) for row in lines]
    n_cases = len(evaluation.cases)
    table.append(f"{n_cases} case{'s' if n_cases != 1 else ''}. (n): cases a mean is over. Dice: cases with the label in "
                 "the prediction or the reference\n(a miss or a false positive scores 0); HD95: cases with it in both. "
                 "std: population.")
    return "\n".join(table)
