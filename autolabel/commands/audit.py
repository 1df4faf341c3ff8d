"""``labeltriage audit RUN_DIR``: the audit sample of an auto-label run, and its precision.

Lists the items the gate flagged for human audit (CSV: ``item_id, run_id, uri,
difficulty, label, state``), judges those a person has reviewed since by the review rule,
prints the audit precision and records it in ``RUN_DIR/autolabel.json``.  For a Label
Studio project it also writes ``RUN_DIR/audit_view.json``: a Data Manager view of the
audit tasks, ready to POST to ``/api/dm/views/``.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from typing import Any

import click

from autolabel.commands._common import parse_storage_options, storage_options_option
from connectors.errors import UsageError

VIEW_FILENAME = "audit_view.json"


def label_text(annotations: list[Any]) -> str:
    """``stop ×1, trafficlight ×2``, or ``empty`` for a label without objects."""
    counts = Counter(a.label for a in annotations)
    return ", ".join(f"{c} ×{n}" for c, n in sorted(counts.items())) or "empty"


def label_studio_view(project_url: str, task_ids: list[str], run_id: str) -> dict[str, Any]:
    """The body of a Data Manager view (``POST /api/dm/views/``) holding these tasks."""
    from connectors.formats.labelstudio_api import parse_project_url

    ids = [int(t) for t in task_ids if str(t).isdigit()]
    return {
        "project": parse_project_url(project_url).project_id,
        "data": {
            "title": f"audit {run_id}",
            "filters": {
                "conjunction": "or",
                "items": [
                    {"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": i}
                    for i in ids
                ],
            },
        },
    }


@click.command("audit")
@click.argument("run_dir")
@click.option("--source", "-s", default=None, help="The project (default: the one the run used).")
@click.option("--format", "-f", "fmt", default=None, help="Its format (default: the run's).")
@click.option(
    "--all-runs", is_flag=True, help="List the audit items of every run, not only this one's."
)
@click.option("--out", default=None, help="Write the CSV to this file instead of stdout.")
@storage_options_option("fsspec storage options as a JSON object (project and RUN_DIR).")
def audit(
    run_dir: str,
    source: str | None,
    fmt: str | None,
    all_runs: bool,
    out: str | None,
    storage_options: str | None,
) -> None:
    """List the audit sample of the auto-label run in RUN_DIR (CSV) and measure audit
    precision from the human labels that came back on audited items since."""
    from autolabel.audit import audit_verdicts, summarize_audit
    from connectors.project import open_project
    from connectors.storage import ProjectFS
    from difficulty.runrecord import read_gate_record, write_gate_record
    from difficulty.table import read_difficulty

    options = parse_storage_options(storage_options)
    record = read_gate_record(run_dir, options)
    if record is None:
        raise UsageError(f"{run_dir}: no autolabel.json here (run the gate first)")
    table, meta = read_difficulty(run_dir, options)
    source = source or record.source or meta.get("source")
    if not source:
        raise UsageError("the run records no project: give --source")
    project = open_project(source, fmt or str(meta.get("format") or "auto"), options)

    verdicts = audit_verdicts(project)
    precision = summarize_audit(verdicts, delta=record.delta)
    mine = [v for v in verdicts if all_runs or v.run_id == record.run_id]
    score = dict(zip(table["item_id"].astype(str), table["score"], strict=True))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["item_id", "run_id", "uri", "difficulty", "label", "state"])
    for v in mine:
        difficulty = score.get(v.item_id)
        writer.writerow(
            [
                v.item_id,
                v.run_id,
                v.uri or "",
                "" if difficulty is None else f"{difficulty:.4f}",
                label_text(v.annotations),
                v.state,
            ]
        )
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(buf.getvalue())
    else:
        click.echo(buf.getvalue(), nl=False)

    record.audit_precision = precision
    write_gate_record(run_dir, record, options)
    this = precision.per_run.get(record.run_id)
    pending = sum(1 for v in mine if v.correct is None)
    lines = [
        f"{len(mine)} audited items listed ({pending} not reviewed yet)"
        + (f"; CSV in {out}" if out else ""),
        (
            f"audit precision: {precision.correct} right of {precision.reviewed} reviewed "
            f"({100 * precision.precision:.1f} %), error ≤ {precision.error_bound:.3f} at "
            f"{100 * (1 - precision.delta):g} % confidence; over {precision.runs} run(s)"
            if precision.precision is not None
            else "audit precision: nothing reviewed yet"
        ),
    ]
    if this is not None:
        lines.append(f"run {record.run_id}: {this.correct} right of {this.reviewed} reviewed")
    if getattr(project, "name", "") == "labelstudio_api":
        view = label_studio_view(source, [v.item_id for v in mine], record.run_id)
        path = ProjectFS(run_dir, options).write_text(VIEW_FILENAME, json.dumps(view, indent=1))
        lines.append(f"Label Studio view of these tasks (POST it to /api/dm/views/): {path}")
    for line in lines:
        click.echo(line, err=True)
