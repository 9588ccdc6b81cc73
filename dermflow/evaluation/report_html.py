"""The run report's HTML page, rendered from `templates/report.html.j2` (Jinja2, autoescaped).

This module turns the metrics and figures into what the template shows: tables of cells (numbers
formatted and given a sort key), figures as data: URIs, the summary cards. The template holds the
markup, the CSS, the sorting script and the fixed texts; every value it prints is escaped, so a
label, run id or error message can never inject markup.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jinja2
import numpy as np

from dermflow.evaluation.report_figures import confusion_counts, confusion_pairs, data_view
from dermflow.evaluation.report_inputs import ArchResult, ReportInputs
from dermflow.evaluation.report_metrics import DISCLAIMER_TEXT, LICENCE_TEXT, format_value, table_rows, watermark_sentence
from dermflow.metrics import RANGE_ORDER

TEMPLATE = "report.html.j2"
FIGURE_TITLES = {
    "weighted_f1_by_architecture": "Weighted F1 per architecture",
    "accuracy_by_architecture": "Accuracy per architecture",
    "per_range": "Accuracy and weighted F1 per skin-type range",
    "top_k_accuracy": "Top-k accuracy",
    "calibration": "Reliability diagram",
    "confusion_all_labels": "Confusion matrix, all labels",
    "confusion_top5": "Confusion matrix, five most frequent labels",
    "misclassified_examples": "Misclassified examples",
    "correct_examples": "Correctly classified examples",
    "training_curves": "Training curves",
    "tuning": "Tuning trials",
    "fetch_outcomes": "Fetch outcomes",
    "split_by_range": "Split sizes by range",
}

SECTIONS = (
    ("summary", "Summary"), ("data", "Data"), ("architectures", "Architectures"),
    ("failed", "Failed architectures"), ("per-range", "Skin-type ranges"), ("verified-test", "Verified test"),
    ("top-k", "Top-k"), ("calibration", "Calibration"), ("confusion", "Confusion"),
    ("examples", "Examples"), ("per-class", "Per class"), ("training", "Training"), ("tuning", "Tuning"),
    ("retrain", "Retrain decision"), ("params", "Parameters"), ("licence", "Licence & use"),
)


# --- tables -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One table cell. Numbers carry `sort_value` (the page's sorting script reads it as data-v);
    `preformatted` text (JSON, error messages) is shown in a <pre>."""

    text: str
    sort_value: str | None = None
    preformatted: bool = False


@dataclass
class Row:
    """A table row; `css_class` marks the best ("best") or a failed ("failed") architecture."""

    cells: list[Cell]
    css_class: str = ""


@dataclass
class Table:
    """A table as the template's `table` macro draws it; `numeric` says which columns hold numbers."""

    headers: list[str]
    numeric: list[bool]
    rows: list[Row] = field(default_factory=list)
    table_id: str | None = None
    sortable: bool = False

    @property
    def header_cells(self) -> list[tuple[str, bool]]:
        return list(zip(self.headers, self.numeric))


def number_cell(value: Any, digits: int = 3) -> Cell:
    """A right-aligned number; anything else in a number column shows as text and sorts first."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return Cell(format_value(value, digits), sort_value="-1")
    if isinstance(value, int):
        text = f"{value:,}"
    elif 0 < value < 0.001:  # learning rates and the like
        text = f"{value:.3g}"
    else:
        text = f"{value:.{digits}f}"
    return Cell(text, sort_value=f"{value}")


def text_cell(value: Any) -> Cell:
    return value if isinstance(value, Cell) else Cell(str(value))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, sortable: bool = False,
          table_id: str | None = None, row_classes: Sequence[str] | None = None,
          numeric: Sequence[bool] | None = None) -> Table:
    numeric = list(numeric or [False] * len(headers))
    body = [Row([number_cell(v) if is_num else text_cell(v) for v, is_num in zip(row, numeric)],
                row_classes[index] if row_classes else "")
            for index, row in enumerate(rows)]
    return Table(list(headers), numeric, body, table_id, sortable)


def kv_table(items: Mapping[str, Any]) -> Table:
    rows = [[k, Cell(json.dumps(v, default=str), preformatted=True) if isinstance(v, (dict, list)) else v]
            for k, v in items.items()]
    return table(["name", "value"], rows)


def figure_views(figures: Mapping[str, bytes]) -> dict[str, dict[str, str]]:
    """name -> the image as a data: URI and its alt text."""
    return {name: {"src": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                   "alt": FIGURE_TITLES.get(name, name)}
            for name, png in figures.items()}


# --- sections ---------------------------------------------------------------------------------
def summary_cards(metrics: Mapping) -> list[tuple[str, str]]:
    best = metrics.get("best_architecture")
    archs = metrics["architectures"]
    n_ok = sum(a["status"] == "ok" for a in archs.values())
    cards = []
    if best:
        test = archs[best]["test"]
        cards += [("best architecture", best), ("weighted F1 (test)", format_value(test["weighted_f1"])),
                  ("accuracy (test)", format_value(test["accuracy"])), ("top-5 accuracy", format_value(test["top5_accuracy"])),
                  ("test rows", f"{test['n']:,}"),
                  ("range gap (wF1)", format_value(test.get("range_gap_weighted_f1")))]
    cards.append(("architectures ok / failed", f"{n_ok} / {len(archs) - n_ok}"))
    decision = metrics.get("retrain_decision")
    if decision:
        cards.append(("retrain", "promoted" if decision.get("promoted") else "not promoted"))
    return cards


DUPLICATE_CHECKS = {"groups": "near-duplicate groups", "images": "images in near-duplicate groups",
                    "cross_split": "groups spanning train/val/test splits",
                    "exact": "groups of exact (byte-identical) duplicates",
                    "label_conflict_groups": "groups whose members carry different labels",
                    "label_conflicts": "groups whose members carry different labels"}


def data_section(summary: Mapping) -> dict[str, Any]:
    """The data section: fetch outcomes, split sizes (overall, by range, by label), duplicates."""
    data = data_view(summary)
    return {"overview": _fetch_overview(data), "fetch_failures": _fetch_failures(data),
            "dropped_labels": ", ".join(map(str, data["dropped_labels"])),
            **_split_tables(data), **_quality_tables(data)}


def _fetch_overview(data: Mapping) -> Table:
    overview = {"dataset rows": data["rows"], "images fetched": data["fetched_ok"]}
    failed = data["failed_by_reason"]
    if failed is not None:
        overview["fetch failures"] = int(sum(failed.values()))
    if data["md5_mismatch"] is not None:
        overview["fetched images whose MD5 differs from the dataset's"] = data["md5_mismatch"]
    if data["bytes"] is not None:
        overview["image megabytes stored"] = int(round(data["bytes"] / 1e6))
    return table(["", "count"], [[k, v if v is not None else "not recorded"] for k, v in overview.items()],
                 numeric=[False, True])


def _fetch_failures(data: Mapping) -> Table | None:
    failed = data["failed_by_reason"]
    if not failed:
        return None
    return table(["reason", "rows"], sorted(failed.items(), key=lambda kv: -kv[1]), numeric=[False, True])


def _split_tables(data: Mapping) -> dict[str, Any]:
    """Rows per split (by range), and rows per label and split."""
    split_by_range = data["split_by_range"]
    split_sizes = data["split_sizes"] or {s: int(sum(v.values())) for s, v in split_by_range.items()}
    sizes = None
    if split_sizes:
        ranges = [r for r in RANGE_ORDER if any(r in v for v in split_by_range.values())]
        headers = ["split", "rows", *ranges]
        rows = [[s, n, *[split_by_range.get(s, {}).get(r, 0) for r in ranges]] for s, n in split_sizes.items()]
        sizes = table(headers, rows, numeric=[False] + [True] * (len(headers) - 1))
    split_by_label = data["split_by_label"]
    by_label, labels = None, []
    if split_by_label:
        splits = list(split_by_label)
        labels = sorted({lab for v in split_by_label.values() for lab in v},
                        key=lambda lab: (-sum(split_by_label[s].get(lab, 0) for s in splits), lab))
        rows = [[lab, *[split_by_label[s].get(lab, 0) for s in splits]] for lab in labels]
        by_label = table(["label", *splits], rows, sortable=True, table_id="split-by-label",
                         numeric=[False] + [True] * len(splits))
    return {"split_sizes": sizes, "split_by_label": by_label, "n_labels": len(labels)}


def _quality_tables(data: Mapping) -> dict[str, Table | None]:
    """Duplicate and label-quality counts, and the near-duplicate groups whose labels conflict."""
    quality, conflicts = [], []
    duplicates = data["duplicates"]
    for key, value in duplicates.items():
        if isinstance(value, (list, tuple)):  # the listed conflicting groups themselves
            conflicts = list(value)
            if "label_conflict_groups" not in duplicates:
                quality.append([DUPLICATE_CHECKS.get(key, key), len(value)])
        elif not isinstance(value, Mapping):
            quality.append([DUPLICATE_CHECKS.get(key, key.replace("_", " ")), value])
    for key, value in data["label_quality"].items():
        quality.append([f"label quality: {key.replace('_', ' ')}", value])
    conflict_rows = [[c.get("dup_group", ""), ", ".join(map(str, c.get("labels", []))),
                      ", ".join(map(str, c.get("splits", []))), len(c.get("md5hashes", []))]
                     for c in conflicts if isinstance(c, Mapping)]
    return {"quality": table(["check", "count"], quality, numeric=[False, True]) if quality else None,
            "conflicts": table(["group", "labels", "splits", "images"], conflict_rows) if conflicts else None}


ARCH_HEADERS = ["architecture", "status", "test rows", "accuracy", "weighted F1", "macro F1", "top-3", "top-5",
                "range gap (wF1)", "ECE", "verified-test wF1", "train time (s)", "trained on", "train img/s",
                "inference img/s"]


def architectures_table(metrics: Mapping) -> Table:
    rows, classes = [], []
    for row in table_rows(metrics):
        rows.append([row["architecture"] + (" ★" if row["best"] else ""), row["status"], row["n_test"], row["accuracy"],
                     row["weighted_f1"], row["macro_f1"], row["top3_accuracy"], row["top5_accuracy"],
                     row["range_gap_weighted_f1"], row["ece"], row["verified_test_weighted_f1"],
                     round(row["seconds"]) if isinstance(row["seconds"], (int, float)) else None,
                     row["device"], row["train_images_per_second"], row["inference_images_per_second"]])
        classes.append("best" if row["best"] else ("failed" if row["status"] != "ok" else ""))
    return table(ARCH_HEADERS, rows, sortable=True, table_id="architectures-table", row_classes=classes,
                 numeric=[False, False] + [True] * 10 + [False, True, True])


def failed_table(metrics: Mapping) -> Table | None:
    failed = metrics["failed"]
    if not failed:
        return None
    rows = [[f["architecture"], Cell(f["reason"], preformatted=True)] for f in failed]
    return table(["architecture", "why it failed"], rows)


def per_range_table(metrics: Mapping) -> Table | None:
    archs = {n: a for n, a in metrics["architectures"].items() if a["status"] == "ok" and a["test"]}
    if not archs:
        return None
    headers = ["architecture", "skin-type range", "test rows", "accuracy", "weighted F1",
               "wF1 − best known range", "architecture's gap (wF1)"]
    rows = []
    for name, a in archs.items():
        per_range = a["test"].get("per_range", {})
        known = [v["weighted_f1"] for r, v in per_range.items() if r != "unknown" and v["weighted_f1"] is not None]
        for r in RANGE_ORDER:
            if r not in per_range:
                continue
            values = per_range[r]
            behind = values["weighted_f1"] - max(known) if (known and r != "unknown") else None
            rows.append([name, r, values.get("n"), values.get("accuracy"), values.get("weighted_f1"), behind,
                         a["test"].get("range_gap_weighted_f1")])
    return table(headers, rows, sortable=True, table_id="per-range-table",
                 numeric=[False, False] + [True] * (len(headers) - 2))


def verified_table(metrics: Mapping) -> Table | None:
    rows = []
    for name, a in metrics["architectures"].items():
        if a["status"] != "ok" or not a["test"]:
            continue
        v = a.get("verified_test") or {}
        t = a["test"]
        rows.append([name, t["n"], t["accuracy"], t["weighted_f1"], v.get("n"), v.get("accuracy"), v.get("weighted_f1"),
                     (v.get("weighted_f1") - t["weighted_f1"]) if v.get("weighted_f1") is not None and t["weighted_f1"] is not None else None])
    if not rows:
        return None
    return table(["architecture", "test n", "test accuracy", "test wF1", "verified n", "verified accuracy",
                  "verified wF1", "verified − test wF1"], rows, numeric=[False] + [True] * 7)


def _most_mistaken_for(result: ArchResult) -> list[str]:
    """Per true label: the wrong label it is most often predicted as, with the share of its rows."""
    test = result.test
    n = len(result.class_names)
    counts = confusion_counts(test.y_true, test.y_pred, n)
    np.fill_diagonal(counts, 0)
    support = np.bincount(test.y_true, minlength=n)
    out = []
    for label in range(n):
        other = int(counts[label].argmax())
        out.append(f"{result.class_names[other]} ({counts[label, other] / support[label]:.0%})"
                   if counts[label, other] else "")
    return out


def per_class_table(inputs: ReportInputs, metrics: Mapping) -> Table | None:
    """The best architecture per label, beside the F1 of the others."""
    best = metrics.get("best_architecture")
    if not best:
        return None
    others = [n for n, a in metrics["architectures"].items() if a["status"] == "ok" and a["test"] and n != best]
    other_f1 = {n: {c["label"]: c["f1"] for c in metrics["architectures"][n]["test"]["per_class"]} for n in others}
    mistaken_for = _most_mistaken_for(inputs.architectures[best])
    rows = []
    for c, confused in zip(metrics["architectures"][best]["test"]["per_class"], mistaken_for):
        rows.append([c["label"], c["support"], c["precision"], c["recall"], c["f1"], confused,
                     *[other_f1[n].get(c["label"]) for n in others]])
    headers = ["label", "support", "precision", "recall", "F1", "most often predicted instead",
               *[f"F1 {n}" for n in others]]
    return table(headers, rows, sortable=True, table_id="per-class-table",
                 numeric=[False, True, True, True, True, False] + [True] * len(others))


def confusion_pairs_table(inputs: ReportInputs, metrics: Mapping) -> Table | None:
    best = metrics.get("best_architecture")
    if not best:
        return None
    pairs = confusion_pairs(inputs.architectures[best], limit=15)
    return table(["true label", "predicted label", "rows", "share of the true label"],
                 [[p["true"], p["predicted"], p["count"], p["share_of_true"]] for p in pairs],
                 sortable=True, table_id="confusion-pairs", numeric=[False, False, True, True])


def tuning_table(inputs: ReportInputs) -> Table | None:
    trials = list(inputs.tuning_trials or [])
    if not trials:
        return None
    names: list[str] = []
    for t in trials:
        names += [k for k in t.get("hyperparameters", {}) if k not in names]
    # what the final training took, and trials the deadline cut off (never chosen)
    def note(t: Mapping) -> str:
        marks = ["defaults"] if t.get("default") else []
        marks += ["cut off by the deadline"] if t.get("cut_off") else []
        marks += ["chosen for the final training"] if t.get("chosen") else []
        return ", ".join(marks)

    rows = [[t.get("trial_id", i + 1), t.get("score"), note(t),
             *[t.get("hyperparameters", {}).get(k, "") for k in names]] for i, t in enumerate(trials)]
    numeric = [False, True, False] + [all(isinstance(t.get("hyperparameters", {}).get(k), (int, float)) for t in trials)
                                      for k in names]
    return table(["trial", "score", "note", *names], rows, sortable=True, table_id="tuning-table", numeric=numeric)


def retrain_section(metrics: Mapping) -> dict[str, Any] | None:
    decision = metrics.get("retrain_decision")
    if not decision:
        return None
    return {"promoted": bool(decision.get("promoted")), "table": kv_table(decision)}


# --- the page ---------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("dermflow.evaluation", "templates"),
        autoescape=True,  # every value is escaped: labels, run ids and errors come from data
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
    )
    return environment.get_template(TEMPLATE)


def page_view(inputs: ReportInputs, metrics: Mapping, figures: Mapping[str, bytes]) -> dict[str, Any]:
    """Everything the template shows, section by section."""
    return {
        "run_id": inputs.run_id,
        "n_architectures": len(metrics["architectures"]),
        "sections": SECTIONS,
        "section_titles": dict(SECTIONS),
        "disclaimer": DISCLAIMER_TEXT,
        "licence": LICENCE_TEXT,
        "figures": figure_views(figures),
        "summary": {"cards": summary_cards(metrics), "best": metrics.get("best_architecture")},
        "data": data_section(inputs.data_summary),
        "architectures": architectures_table(metrics),
        "failed": failed_table(metrics),
        "per_range": per_range_table(metrics),
        "verified": verified_table(metrics),
        "confusion_pairs": confusion_pairs_table(inputs, metrics),
        "has_image_loader": bool(inputs.load_image),
        "has_saliency": bool(inputs.saliency),
        "watermark": watermark_sentence(metrics["watermark_check"]) if metrics.get("watermark_check") else None,
        "watermark_flagged": bool((metrics.get("watermark_check") or {}).get("leans_on_strip")),
        "per_class": per_class_table(inputs, metrics),
        "tuning": tuning_table(inputs),
        "retrain": retrain_section(metrics),
        "params": kv_table(dict(inputs.params)) if inputs.params else None,
    }


def render_html(inputs: ReportInputs, metrics: Mapping, figures: Mapping[str, bytes]) -> str:
    """One self-contained page: inline CSS and JS, figures as data: URIs, no external requests."""
    return _template().render(page_view(inputs, metrics, figures))
