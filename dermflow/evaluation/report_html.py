"""The run report's HTML page: one self-contained document (inline CSS and JS, figures as
data: URIs) with a section per concern."""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dermflow.evaluation.report_figures import _confusion, confusion_pairs, data_view
from dermflow.evaluation.report_inputs import ArchResult, ReportInputs
from dermflow.evaluation.report_metrics import DISCLAIMER_TEXT, LICENCE_TEXT, _fmt, table_rows
from dermflow.metrics import RANGE_ORDER

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


CSS = """
:root{--ink:#1d2733;--muted:#5b6775;--line:#d9dee4;--accent:#1f5f99;--bad:#b03a2e;--good:#2e7d4f;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 "DejaVu Sans",system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:var(--bg)}
header{background:#17324d;color:#fff;padding:22px 32px}
header h1{margin:0 0 4px;font-size:26px}
header p{margin:0;color:#c9d6e3}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:8px 32px;font-size:13.5px;
 display:flex;flex-wrap:wrap;gap:4px 14px}
nav a{color:var(--accent);text-decoration:none;white-space:nowrap}
main{max-width:1280px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:18px 24px;margin:18px 0}
h2{margin:0 0 10px;font-size:21px;color:#17324d}
h3{margin:18px 0 8px;font-size:16.5px}
.banner{border-left:6px solid var(--bad);background:#fdf1ef}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{flex:1 1 170px;border:1px solid var(--line);border-radius:8px;padding:10px 14px;background:#fbfcfd}
.card .v{font-size:22px;font-weight:bold}
.card .k{color:var(--muted);font-size:12.5px;text-transform:uppercase;letter-spacing:.03em}
table{border-collapse:collapse;margin:8px 0;font-size:13.5px}
th,td{border-bottom:1px solid var(--line);padding:5px 10px;text-align:left;vertical-align:top}
th{background:#eef2f6}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th::after{content:" \\2195";color:#9aa5b1;font-size:11px}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2";color:var(--accent)}
table.sortable th[aria-sort=descending]::after{content:" \\25BC";color:var(--accent)}
tr.best td{background:#eef7f0;font-weight:bold}
tr.failed td{color:var(--bad)}
.scroll{max-height:560px;overflow:auto;border:1px solid var(--line);border-radius:6px}
.scroll th{position:sticky;top:0}
figure{margin:12px 0}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px;background:#fff}
.frame{overflow:auto;max-height:1100px;border:1px solid var(--line);border-radius:6px}
.frame img{max-width:100%;border:0;cursor:zoom-in}
.frame img.zoomed{max-width:none;cursor:zoom-out}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}
.muted{color:var(--muted)}
.bad{color:var(--bad)}
pre{white-space:pre-wrap;background:#f4f4f4;padding:8px;border-radius:4px;font-size:12.5px;margin:4px 0}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:12px}
footer{color:var(--muted);font-size:13px;text-align:center;padding:20px}
"""

# Sort a table on header click: numbers by data-v (or text), toggling direction. No libraries.
SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var asc=th.getAttribute('aria-sort')!=='ascending';
  t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort')});
  th.setAttribute('aria-sort',asc?'ascending':'descending');
  var b=t.tBodies[0],rows=Array.from(b.rows);
  function key(r){var c=r.cells[i],v=c.getAttribute('data-v');return v!==null?parseFloat(v):c.textContent.trim().toLowerCase()}
  rows.sort(function(a,c){var x=key(a),y=key(c);if(x===y)return 0;return (x<y?-1:1)*(asc?1:-1)});
  rows.forEach(function(r){b.appendChild(r)});});});});
document.querySelectorAll('.frame img').forEach(function(i){i.addEventListener('click',function(){i.classList.toggle('zoomed')})});
"""

SECTIONS = (
    ("summary", "Summary"), ("data", "Data"), ("architectures", "Architectures"),
    ("failed", "Failed architectures"), ("per-range", "Skin-type ranges"), ("verified-test", "Verified test"),
    ("top-k", "Top-k"), ("calibration", "Calibration"), ("confusion", "Confusion"),
    ("examples", "Examples"), ("per-class", "Per class"), ("training", "Training"), ("tuning", "Tuning"),
    ("retrain", "Retrain decision"), ("params", "Parameters"), ("licence", "Licence & use"),
)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num_cell(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return f'<td class="n" data-v="-1">{_e(_fmt(value, digits))}</td>'
    if isinstance(value, int):
        text = f"{value:,}"
    elif 0 < value < 0.001:  # learning rates and the like
        text = f"{value:.3g}"
    else:
        text = f"{value:.{digits}f}"
    return f'<td class="n" data-v="{value}">{text}</td>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, sortable: bool = False,
           table_id: str | None = None, row_classes: Sequence[str] | None = None, numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(headers)
    attrs = (f' id="{table_id}"' if table_id else "") + (' class="sortable"' if sortable else "")
    head = "".join(f'<th{" class=n" if is_num else ""} scope="col">{_e(h)}</th>' for h, is_num in zip(headers, numeric))
    body = []
    for index, row in enumerate(rows):
        cls = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        cells = "".join(_num_cell(v) if is_num else f"<td>{v if isinstance(v, _Raw) else _e(v)}</td>"
                        for v, is_num in zip(row, numeric))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _img(figures: Mapping[str, bytes], name: str, caption: str, *, wide: bool = False) -> str:
    if name not in figures:
        return ""
    data = base64.b64encode(figures[name]).decode("ascii")
    alt = FIGURE_TITLES.get(name, name)
    image = f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" data-figure="{_e(name)}">'
    if wide:  # big canvas: fits the column; a click shows it at full size, scrolling inside the frame
        image = f'<div class="frame">{image}</div>'
    return f'<figure id="fig-{name}">{image}<figcaption>{_e(caption)}</figcaption></figure>'



def _kv_table(items: Mapping[str, Any]) -> str:
    rows = [[k, _Raw(f"<pre>{_e(json.dumps(v, default=str))}</pre>") if isinstance(v, (dict, list)) else v]
            for k, v in items.items()]
    return _table(["name", "value"], rows)


def _section(section_id: str, body: str) -> str:
    title = dict(SECTIONS)[section_id]
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{body}</section>'


def _not_recorded(what: str) -> str:
    return f'<p class="muted">{_e(what)}: not recorded for this run.</p>'


def _html_summary(metrics: Mapping) -> str:
    best = metrics.get("best_architecture")
    archs = metrics["architectures"]
    n_ok = sum(a["status"] == "ok" for a in archs.values())
    cards = []
    if best:
        test = archs[best]["test"]
        cards += [("best architecture", best), ("weighted F1 (test)", _fmt(test["weighted_f1"])),
                  ("accuracy (test)", _fmt(test["accuracy"])), ("top-5 accuracy", _fmt(test["top5_accuracy"])),
                  ("test rows", f"{test['n']:,}"),
                  ("range gap (wF1)", _fmt(test.get("range_gap_weighted_f1")))]
    cards.append(("architectures ok / failed", f"{n_ok} / {len(archs) - n_ok}"))
    decision = metrics.get("retrain_decision")
    if decision:
        cards.append(("retrain", "promoted" if decision.get("promoted") else "not promoted"))
    html_cards = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>' for k, v in cards)
    intro = ("" if best else '<p class="bad"><b>No architecture finished successfully;</b> see '
             '<a href="#failed">failed architectures</a>.</p>')
    return _section("summary", f'<div class="cards">{html_cards}</div>{intro}'
                    f'<p class="muted">Best architecture = highest weighted F1 on the test split. '
                    f'All metrics are computed on held-out test rows.</p>')


def _html_data(summary: Mapping, figures: Mapping[str, bytes]) -> str:
    data = data_view(summary)
    parts = []
    overview = {"dataset rows": data["rows"], "images fetched": data["fetched_ok"]}
    failed = data["failed_by_reason"]
    if failed is not None:
        overview["fetch failures"] = int(sum(failed.values()))
    if data["md5_mismatch"] is not None:
        overview["fetched images whose MD5 differs from the dataset's"] = data["md5_mismatch"]
    if data["bytes"] is not None:
        overview["image megabytes stored"] = int(round(data["bytes"] / 1e6))
    parts.append(_table(["", "count"], [[k, v if v is not None else "not recorded"] for k, v in overview.items()],
                        numeric=[False, True]))
    if data["dropped_labels"]:
        parts.append(f'<p class="bad">Labels dropped for too few images: {_e(", ".join(map(str, data["dropped_labels"])))}</p>')
    if failed:
        parts.append("<h3>Fetch failures by reason</h3>")
        parts.append(_table(["reason", "rows"], sorted(failed.items(), key=lambda kv: -kv[1]), numeric=[False, True]))
    parts.append(_img(figures, "fetch_outcomes", "Every dataset row's fetch outcome; failed rows are excluded from training and evaluation."))
    split_by_range = data["split_by_range"]
    split_sizes = data["split_sizes"] or {s: int(sum(v.values())) for s, v in split_by_range.items()}
    if split_sizes:
        parts.append("<h3>Split sizes</h3>")
        ranges = [r for r in RANGE_ORDER if any(r in v for v in split_by_range.values())]
        headers = ["split", "rows", *ranges]
        rows = [[s, n, *[split_by_range.get(s, {}).get(r, 0) for r in ranges]] for s, n in split_sizes.items()]
        parts.append(_table(headers, rows, numeric=[False] + [True] * (len(headers) - 1)))
    parts.append(_img(figures, "split_by_range", "Rows per split, stacked by Fitzpatrick skin-type range."))
    split_by_label = data["split_by_label"]
    if split_by_label:
        splits = list(split_by_label)
        labels = sorted({lab for v in split_by_label.values() for lab in v},
                        key=lambda lab: (-sum(split_by_label[s].get(lab, 0) for s in splits), lab))
        rows = [[lab, *[split_by_label[s].get(lab, 0) for s in splits]] for lab in labels]
        parts.append(f"<details><summary>Split sizes per label ({len(labels)} labels; click to open, headers sort)</summary>"
                     f'<div class="scroll">{_table(["label", *splits], rows, sortable=True, table_id="split-by-label", numeric=[False] + [True] * len(splits))}</div></details>')
    quality = []
    duplicates = data["duplicates"]
    names = {"groups": "near-duplicate groups", "images": "images in near-duplicate groups",
             "cross_split": "groups spanning train/val/test splits", "exact": "groups of exact (byte-identical) duplicates",
             "label_conflict_groups": "groups whose members carry different labels",
             "label_conflicts": "groups whose members carry different labels"}
    conflicts = []
    for key, value in duplicates.items():
        if isinstance(value, (list, tuple)):  # the listed conflicting groups themselves
            conflicts = list(value)
            if "label_conflict_groups" not in duplicates:
                quality.append([names.get(key, key), len(value)])
        elif not isinstance(value, Mapping):
            quality.append([names.get(key, key.replace("_", " ")), value])
    for key, value in data["label_quality"].items():
        quality.append([f"label quality: {key.replace('_', ' ')}", value])
    parts.append('<h3 id="duplicates">Duplicates and label quality</h3>')
    parts.append(_table(["check", "count"], quality, numeric=[False, True]) if quality
                 else _not_recorded("Duplicate and label-quality counts"))
    if conflicts:
        rows = [[c.get("dup_group", ""), ", ".join(map(str, c.get("labels", []))),
                 ", ".join(map(str, c.get("splits", []))), len(c.get("md5hashes", []))]
                for c in conflicts if isinstance(c, Mapping)]
        parts.append(f"<details><summary>Near-duplicate groups with conflicting labels ({len(rows)} listed)</summary>"
                     + _table(["group", "labels", "splits", "images"], rows) + "</details>")
    return _section("data", "".join(parts))


ARCH_HEADERS = ["architecture", "status", "test rows", "accuracy", "weighted F1", "macro F1", "top-3", "top-5",
                "range gap (wF1)", "ECE", "verified-test wF1", "train time (s)"]


def _html_architectures(metrics: Mapping, figures: Mapping[str, bytes]) -> str:
    rows, classes = [], []
    for row in table_rows(metrics):
        rows.append([row["architecture"] + (" ★" if row["best"] else ""), row["status"], row["n_test"], row["accuracy"],
                     row["weighted_f1"], row["macro_f1"], row["top3_accuracy"], row["top5_accuracy"],
                     row["range_gap_weighted_f1"], row["ece"], row["verified_test_weighted_f1"],
                     round(row["seconds"]) if isinstance(row["seconds"], (int, float)) else None])
        classes.append("best" if row["best"] else ("failed" if row["status"] != "ok" else ""))
    body = _table(ARCH_HEADERS, rows, sortable=True, table_id="architectures-table", row_classes=classes,
                  numeric=[False, False] + [True] * 10)
    body += ('<p class="muted">★ best by test weighted F1. Range gap = best minus worst weighted F1 over the known '
             'Fitzpatrick ranges. ECE = expected calibration error of the top-1 confidence.</p>')
    body += '<div class="grid2">' + _img(figures, "weighted_f1_by_architecture", "Weighted F1 on the test split.")
    body += _img(figures, "accuracy_by_architecture", "Accuracy on the test split.") + "</div>"
    return _section("architectures", body)


def _html_failed(metrics: Mapping) -> str:
    failed = metrics["failed"]
    if not failed:
        return _section("failed", '<p class="muted">Every architecture finished.</p>')
    rows = [[f["architecture"], _Raw(f"<pre>{_e(f['reason'])}</pre>")] for f in failed]
    return _section("failed", f'<p class="bad">{len(failed)} architecture(s) failed; the others were evaluated '
                    f'as usual.</p>' + _table(["architecture", "why it failed"], rows))


def _html_per_range(metrics: Mapping, figures: Mapping[str, bytes]) -> str:
    archs = {n: a for n, a in metrics["architectures"].items() if a["status"] == "ok" and a["test"]}
    if not archs:
        return _section("per-range", _not_recorded("Per-range metrics"))
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
    body = _table(headers, rows, sortable=True, table_id="per-range-table",
                  numeric=[False, False] + [True] * (len(headers) - 2))
    body += ('<p class="muted">Gap = best minus worst weighted F1 among the known ranges (I-II, III-IV, V-VI); '
             '"unknown" rows have no Fitzpatrick label and are shown but not counted in the gap.</p>')
    body += _img(figures, "per_range", "Performance by Fitzpatrick skin-type range on the test split.")
    return _section("per-range", body)


def _html_verified(metrics: Mapping) -> str:
    rows = []
    for name, a in metrics["architectures"].items():
        if a["status"] != "ok" or not a["test"]:
            continue
        v = a.get("verified_test") or {}
        t = a["test"]
        rows.append([name, t["n"], t["accuracy"], t["weighted_f1"], v.get("n"), v.get("accuracy"), v.get("weighted_f1"),
                     (v.get("weighted_f1") - t["weighted_f1"]) if v.get("weighted_f1") is not None and t["weighted_f1"] is not None else None])
    if not rows:
        return _section("verified-test", _not_recorded("Verified-test metrics"))
    body = _table(["architecture", "test n", "test accuracy", "test wF1", "verified n", "verified accuracy",
                   "verified wF1", "verified − test wF1"], rows, numeric=[False] + [True] * 7)
    body += ('<p class="muted">Verified test = the held-out split of rows with a quality-reviewed label (the '
             'dataset\'s <code>qc</code> column); "–" where the run had none.</p>')
    return _section("verified-test", body)


def _most_mistaken_for(result: ArchResult) -> list[str]:
    """Per true label: the wrong label it is most often predicted as, with the share of its rows."""
    test = result.test
    n = len(result.class_names)
    counts = _confusion(test.y_true, test.y_pred, n)
    np.fill_diagonal(counts, 0)
    support = np.bincount(test.y_true, minlength=n)
    out = []
    for label in range(n):
        other = int(counts[label].argmax())
        out.append(f"{result.class_names[other]} ({counts[label, other] / support[label]:.0%})"
                   if counts[label, other] else "")
    return out


def _html_per_class(inputs: ReportInputs, metrics: Mapping) -> str:
    best = metrics.get("best_architecture")
    if not best:
        return _section("per-class", _not_recorded("Per-class metrics"))
    others = [n for n, a in metrics["architectures"].items() if a["status"] == "ok" and a["test"] and n != best]
    other_f1 = {n: {c["label"]: c["f1"] for c in metrics["architectures"][n]["test"]["per_class"]} for n in others}
    mistaken_for = _most_mistaken_for(inputs.architectures[best])
    rows = []
    for c, confused in zip(metrics["architectures"][best]["test"]["per_class"], mistaken_for):
        rows.append([c["label"], c["support"], c["precision"], c["recall"], c["f1"], confused,
                     *[other_f1[n].get(c["label"]) for n in others]])
    headers = ["label", "support", "precision", "recall", "F1", "most often predicted instead",
               *[f"F1 {n}" for n in others]]
    body = (f"<p>{_e(best)} (best) per label on the test split, with the wrong label it most often predicts "
            f"for it (share of the label's test rows); F1 of the other architectures beside it. "
            f"Click a header to sort.</p>")
    body += '<div class="scroll">' + _table(headers, rows, sortable=True, table_id="per-class-table",
                                           numeric=[False, True, True, True, True, False] + [True] * len(others)) + "</div>"
    return _section("per-class", body)


def _html_confusion(inputs: ReportInputs, metrics: Mapping, figures: Mapping[str, bytes]) -> str:
    best = metrics.get("best_architecture")
    if not best:
        return _section("confusion", _not_recorded("Confusion matrices"))
    result = inputs.architectures[best]
    pairs = confusion_pairs(result, limit=15)
    body = _img(figures, "confusion_all_labels", "All labels, each row normalized to its true label's test rows "
                "(the diagonal is per-class recall). Click the matrix to see it at full size and scroll inside the frame; "
                "click again to fit.", wide=True)
    body += _img(figures, "confusion_top5", "The five labels with the most test rows; predictions of any other label "
                 "are pooled in the last column.")
    body += "<h3>Most frequent confusions</h3>" + _table(
        ["true label", "predicted label", "rows", "share of the true label"],
        [[p["true"], p["predicted"], p["count"], p["share_of_true"]] for p in pairs],
        sortable=True, table_id="confusion-pairs", numeric=[False, False, True, True])
    return _section("confusion", body)


def _html_examples(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    if "misclassified_examples" not in figures and "correct_examples" not in figures:
        return _section("examples", _not_recorded("Example predictions"))
    note = "" if inputs.load_image else '<p class="muted">No image loader was given: thumbnails are placeholders.</p>'
    saliency = (" Heatmaps (red = most influential) show where the model looked." if inputs.saliency else "")
    return _section("examples", note + _img(figures, "misclassified_examples",
                    "Red frame = misclassified. One row per frequent confusion." + saliency)
                    + _img(figures, "correct_examples", "Green frame = correct." + saliency))


def _html_tuning(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    trials = list(inputs.tuning_trials or [])
    if not trials:
        return _section("tuning", _not_recorded("Hyperparameter tuning"))
    names: list[str] = []
    for t in trials:
        names += [k for k in t.get("hyperparameters", {}) if k not in names]
    rows = [[t.get("trial_id", i + 1), t.get("score"), *[t.get("hyperparameters", {}).get(k, "") for k in names]]
            for i, t in enumerate(trials)]
    numeric = [False, True] + [all(isinstance(t.get("hyperparameters", {}).get(k), (int, float)) for t in trials) for k in names]
    body = _img(figures, "tuning", "Objective score per trial, and against each numeric hyperparameter.")
    body += '<div class="scroll">' + _table(["trial", "score", *names], rows, sortable=True, table_id="tuning-table",
                                           numeric=numeric) + "</div>"
    return _section("tuning", body)


def _html_retrain(metrics: Mapping) -> str:
    decision = metrics.get("retrain_decision")
    if not decision:
        return _section("retrain", '<p class="muted">Not a retrain run: no champion/challenger comparison.</p>')
    verdict = ('<p class="card"><b>Challenger promoted.</b></p>' if decision.get("promoted")
               else '<p class="card"><b>Challenger not promoted;</b> the champion stays.</p>')
    return _section("retrain", verdict + _kv_table(decision))


def _html_licence() -> str:
    return _section("licence", f"<p><b>Not for clinical use.</b> {_e(DISCLAIMER_TEXT)}</p><p>{_e(LICENCE_TEXT)} "
                    'Licence: <a href="https://creativecommons.org/licenses/by-nc-sa/3.0/">CC BY-NC-SA 3.0</a>. '
                    "Labels and skin types come from the dataset and contain known errors; metrics on "
                    "skin-type ranges with few rows are uncertain.</p>")


def render_html(inputs: ReportInputs, metrics: Mapping, figures: Mapping[str, bytes]) -> str:
    """One self-contained page: inline CSS and JS, figures as data: URIs, no external requests."""
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
    sections = [
        _html_summary(metrics),
        _html_data(inputs.data_summary, figures),
        _html_architectures(metrics, figures),
        _html_failed(metrics),
        _html_per_range(metrics, figures),
        _html_verified(metrics),
        _section("top-k", _img(figures, "top_k_accuracy", "Share of test rows whose true label is among the k most "
                               "probable.") or _not_recorded("Top-k accuracy")),
        _section("calibration", _img(figures, "calibration", "Bars: accuracy of rows whose top-1 confidence falls in "
                                     "each bin; the diagonal is perfect calibration; ECE = row-weighted mean |accuracy − "
                                     "confidence|.") or _not_recorded("Calibration")),
        _html_confusion(inputs, metrics, figures),
        _html_examples(inputs, figures),
        _html_per_class(inputs, metrics),
        _section("training", _img(figures, "training_curves", "Per-epoch metrics from training: solid = training "
                                  "data, dashed = validation.") or _not_recorded("Training history")),
        _html_tuning(inputs, figures),
        _html_retrain(metrics),
        _section("params", _kv_table(dict(inputs.params)) if inputs.params else _not_recorded("Parameters")),
        _html_licence(),
    ]
    banner = (f'<section class="banner" id="disclaimer"><b>Research use only.</b> {_e(DISCLAIMER_TEXT)} '
              f'Data: Fitzpatrick 17k, CC BY-NC-SA 3.0 (<a href="#licence">details</a>).</section>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>dermflow report {_e(inputs.run_id)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>dermflow run report</h1><p>run <code>{_e(inputs.run_id)}</code> · "
        f"{len(metrics['architectures'])} architecture(s) · Fitzpatrick 17k skin-condition classification</p></header>"
        f"<nav>{nav}</nav><main>{banner}{''.join(sections)}</main>"
        f"<footer>{_e(LICENCE_TEXT)}</footer><script>{SORT_JS}</script></body></html>\n"
    )
