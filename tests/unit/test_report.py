"""The run report built from synthetic predictions: sections, figures, metrics.json, artifacts."""

from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from dermflow import layout
from dermflow.errors import is_transient
from dermflow.evaluation import report as report_module
from dermflow.evaluation import report_figures, report_html
from dermflow.evaluation.report import (
    ArchResult,
    Predictions,
    ReportInputError,
    ReportInputs,
    build_report,
    calibration_bins,
    predictions_from_npz,
    summary_markdown,
)
from dermflow.metrics import RANGE_ORDER

pytestmark = pytest.mark.unit

N_CLASSES = 114
N_ROWS = 600
RANGES = np.array(RANGE_ORDER)


def _label_names(n: int) -> list[str]:
    # some long names, like the dataset's ("lupus subacute", "epidermolysis bullosa ...")
    return [f"condition {i:03d}" + (" with a rather long descriptive name" if i % 7 == 0 else "") for i in range(n)]


def _predictions(rng: np.random.Generator, y_true: np.ndarray, skill: float, md5: np.ndarray, ranges: np.ndarray,
                 n_classes: int) -> Predictions:
    logits = rng.normal(0.0, 1.0, (len(y_true), n_classes))
    hit = rng.random(len(y_true)) < skill
    logits[np.arange(len(y_true)), y_true] += np.where(hit, 4.0, 0.0)
    # a systematic confusion, so the "most frequent confusions" have several rows
    confuse = (y_true == 0) & ~hit
    logits[confuse, 1] += 5.0
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    return Predictions(y_true=y_true, y_prob=(prob / prob.sum(axis=1, keepdims=True)).astype(np.float32),
                       md5hash=md5, fitzpatrick_range=ranges)


def _image_bytes(md5: str) -> bytes:
    seed = int(md5[:8], 16)
    rng = np.random.default_rng(seed)
    pixels = np.full((48, 64, 3), rng.integers(60, 220, 3), dtype=np.uint8)
    pixels[10:30, 20:40] = rng.integers(0, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _saliency(md5: str) -> np.ndarray | None:
    if md5.startswith("0"):
        return None  # the module may have no map for some images
    y, x = np.mgrid[0:7, 0:7]
    return np.exp(-((x - 3) ** 2 + (y - 2) ** 2) / 4.0)


def _architectures(rng: np.random.Generator, seed: int, n_rows: int, names: list[str]) -> dict[str, ArchResult]:
    """Three trained architectures of different skill (one without verified-test rows) and one failed."""
    n_classes = len(names)
    weights = 1.0 / np.arange(1, n_classes + 1) ** 0.8
    y_true = rng.choice(n_classes, size=n_rows, p=weights / weights.sum())
    md5 = np.array([hashlib.md5(f"{seed}-{i}".encode()).hexdigest() for i in range(n_rows)])
    ranges = rng.choice(RANGES, size=n_rows, p=[0.45, 0.35, 0.15, 0.05])
    n_verified = n_rows // 5
    y_verified = rng.choice(n_classes, size=n_verified, p=weights / weights.sum())
    md5_verified = np.array([hashlib.md5(f"v{seed}-{i}".encode()).hexdigest() for i in range(n_verified)])
    ranges_verified = rng.choice(RANGES[:3], size=n_verified)
    architectures = {}
    for name, skill in (("efficientnetb0", 0.55), ("resnet50", 0.4), ("mobilenetv3", 0.3)):
        epochs = 6
        architectures[name] = ArchResult.from_predictions(
            names,
            test=_predictions(rng, y_true, skill, md5, ranges, n_classes),
            verified_test=_predictions(rng, y_verified, skill + 0.1, md5_verified, ranges_verified, n_classes)
            if name != "mobilenetv3" else None,
            history={
                "loss": list(np.linspace(4.5, 2.0, epochs) * (1 - skill / 3)),
                "val_loss": list(np.linspace(4.6, 2.6, epochs)),
                "accuracy": list(np.linspace(0.05, skill + 0.1, epochs)),
                "val_accuracy": list(np.linspace(0.04, skill, epochs)),
                "val_weighted_f1": list(np.linspace(0.03, skill - 0.05, epochs)),
            },
            seconds=120.0 + 10 * skill,
        )
    # the orchestrator fills the flat fields itself, without verified image ids
    resnet = architectures["resnet50"]
    architectures["resnet50"] = ArchResult(
        status="ok", class_names=names, y_true=resnet.y_true, y_prob=resnet.y_prob, md5hash=resnet.md5hash,
        fitzpatrick_range=resnet.fitzpatrick_range, verified_y_true=resnet.verified_y_true,
        verified_y_prob=resnet.verified_y_prob, verified_fitzpatrick_range=resnet.verified_fitzpatrick_range,
        history=resnet.history, seconds=resnet.seconds)
    architectures["inceptionv3"] = ArchResult(status="failed", error="ResourceExhaustedError: OOM when allocating "
                                              "tensor with shape [64,299,299,3] | while training epoch 2")
    return architectures


def _data_summary(rng: np.random.Generator, names: list[str]) -> dict:
    """The shape tasks.runs.data_summary gives: fetch.summarize_manifest + split.split_summary."""
    splits = ("train", "val", "test", "verified_test", "excluded")
    per_label = {n: {s: int(rng.integers(1, 40)) for s in splits} for n in names}
    per_range = {r: {s: int(rng.integers(10, 3000)) for s in splits} for r in RANGE_ORDER}
    failed_by_reason = {"http_404": 2000, "timeout": 300, "no_url": 41, "not_an_image": 236}
    return {
        "rows": 16577, "labels": len(names),
        "fetch": {"rows": 16577, "ok": 14000, "failed": 2577, "by_status": {"ok": 14000, "failed": 2577},
                  "by_reason": failed_by_reason, "md5_mismatch": 3, "bytes": 1_234_000_000},
        "sizes": {s: int(sum(per_range[r][s] for r in RANGE_ORDER)) for s in splits},
        "per_label": per_label, "per_range": per_range,
        "duplicates": {"groups": 310, "images": 680, "cross_split": 0, "exact": 12, "label_conflict_groups": 1,
                       "label_conflicts": [{"dup_group": 17, "labels": [names[0], names[5]],
                                            "md5hashes": ["a" * 32, "b" * 32], "splits": ["train", "test"]}]},
        "label_quality": {"wrongly_labelled_excluded": 20, "diagnostic_verified_test": 504},
        "dropped_labels": [],
    }


def make_inputs(seed: int = 0, n_rows: int = N_ROWS, n_classes: int = N_CLASSES, *, with_images: bool = True) -> ReportInputs:
    """Several architectures (one failed), skewed label frequencies, all four ranges, tuning, retrain."""
    rng = np.random.default_rng(seed)
    names = _label_names(n_classes)
    architectures = _architectures(rng, seed, n_rows, names)
    data_summary = _data_summary(rng, names)
    trials = [{"trial_id": f"{i:02d}", "score": float(rng.uniform(0.2, 0.5)),
               "hyperparameters": {"learning_rate": float(10 ** rng.uniform(-5, -2)), "dropout": float(rng.uniform(0, 0.5)),
                                   "dense_units": int(rng.choice([128, 256, 512])), "optimizer": "adam"}}
              for i in range(8)]
    return ReportInputs(
        run_id=f"20261126-101500-synthetic-{seed}",
        params={"architectures": list(architectures), "epochs": 6, "image_size": 224, "seed": seed,
                "tuning": {"max_trials": 8}},
        data_summary=data_summary,
        architectures=architectures,
        tuning_trials=trials,
        retrain_decision={"champion_score": 0.41, "challenger_score": 0.44, "promoted": True,
                          "reason": "challenger beats champion by 0.03 (threshold 0.01)"},
        load_image=_image_bytes if with_images else None,
        saliency=_saliency if with_images else None,
    )


@pytest.fixture(scope="module")
def inputs() -> ReportInputs:
    return make_inputs()


@pytest.fixture(scope="module")
def built(inputs):
    return build_report(inputs, report_uri=f"s3://bucket/{layout.report_key('x')}")


SECTION_IDS = [sid for sid, _ in report_html.SECTIONS]
EXPECTED_FIGURES = {
    "weighted_f1_by_architecture", "accuracy_by_architecture", "per_range", "top_k_accuracy", "calibration",
    "confusion_all_labels", "confusion_top5", "misclassified_examples", "correct_examples", "training_curves",
    "tuning", "fetch_outcomes", "split_by_range",
}


def test_every_section_and_figure_is_present(built):
    for section_id in SECTION_IDS + ["disclaimer"]:
        assert re.search(rf'<section[^>]* id="{section_id}"', built.html), section_id
    assert set(built.figures) == EXPECTED_FIGURES
    for name in EXPECTED_FIGURES:
        assert f'data-figure="{name}"' in built.html, name
    assert "not recorded for this run" not in built.html
    assert "CC BY-NC-SA 3.0" in built.html and "Atlas Dermatologico" in built.html and "DermaAmin" in built.html
    assert "not for clinical use" in built.html.lower()
    # failed architecture and its reason, escaped
    assert "inceptionv3" in built.html and "ResourceExhaustedError" in built.html
    # the data summary as the pipeline gives it: fetch outcomes, split tables, duplicates, label quality
    assert "groups whose members carry different labels" in built.html and "wrongly labelled excluded" in built.html
    assert 'id="split-by-label"' in built.html and "2,000" in built.html


def test_html_is_self_contained(built):
    assert not re.search(r'(src|href)="(?!data:|#|https://creativecommons.org/)', built.html)
    assert "<script src" not in built.html and "<link" not in built.html
    assert built.html.count("data:image/png;base64,") == len(built.figures)


def test_every_figure_is_a_real_png(built):
    for name, png in built.figures.items():
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG", name
            image.load()
            assert image.width >= 300 and image.height >= 200, (name, image.size)
            # not a blank canvas
            assert np.asarray(image.convert("L")).std() > 5, name
    with Image.open(io.BytesIO(built.figures["confusion_all_labels"])) as image:
        assert min(image.size) >= 2000, "114 labels need a big canvas to stay readable"


def test_no_figure_left_open_and_unreadable_images_become_placeholders():
    import matplotlib.pyplot as plt

    inputs = make_inputs(n_rows=150, n_classes=30)

    def broken_loader(md5: str) -> bytes:
        raise KeyError(md5)

    inputs.load_image = broken_loader
    plt.close("all")
    report = build_report(inputs)
    assert set(report.figures) == EXPECTED_FIGURES
    assert plt.get_fignums() == []


def test_metrics_agree_with_scikit_learn(inputs, built):
    metrics = json.loads(json.dumps(built.metrics, allow_nan=False))  # strict JSON
    assert metrics["run_id"] == inputs.run_id
    assert metrics["duplicates"] == inputs.data_summary["duplicates"]
    assert metrics["label_quality"] == inputs.data_summary["label_quality"]
    for name, result in inputs.architectures.items():
        entry = metrics["architectures"][name]
        assert entry["status"] == result.status
        if result.status != "ok":
            assert entry["test"] is None and "OOM" in entry["error"]
            continue
        y_true, y_pred = result.test.y_true, result.test.y_prob.argmax(axis=1)
        assert entry["test"]["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
        assert entry["test"]["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
        assert entry["test"]["macro_f1"] == pytest.approx(
            f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true)))
        for range_name, values in entry["test"]["per_range"].items():
            mask = result.test.fitzpatrick_range == range_name
            assert values["n"] == int(mask.sum())
            assert values["accuracy"] == pytest.approx(accuracy_score(y_true[mask], y_pred[mask]))
            assert values["weighted_f1"] == pytest.approx(f1_score(y_true[mask], y_pred[mask], average="weighted"))
        known = [v["weighted_f1"] for r, v in entry["test"]["per_range"].items() if r != "unknown"]
        assert entry["test"]["range_gap_weighted_f1"] == pytest.approx(max(known) - min(known))
        top1 = entry["test_top_k_accuracy"]["1"]
        assert top1 == pytest.approx(entry["test"]["accuracy"])
        ks = [entry["test_top_k_accuracy"][str(k)] for k in range(1, 6)]
        assert ks == sorted(ks)
        if result.verified_test is not None:
            v_true, v_pred = result.verified_test.y_true, result.verified_test.y_prob.argmax(axis=1)
            assert entry["verified_test"]["weighted_f1"] == pytest.approx(f1_score(v_true, v_pred, average="weighted"))
        else:
            assert entry["verified_test"] is None
    weighted = {n: a["test"]["weighted_f1"] for n, a in metrics["architectures"].items() if a["status"] == "ok"}
    assert metrics["best_architecture"] == max(weighted, key=weighted.get)
    assert metrics["failed"] == [{"architecture": "inceptionv3",
                                  "reason": inputs.architectures["inceptionv3"].error}]
    assert metrics["retrain_decision"]["promoted"] is True


def test_ece_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    prob = rng.dirichlet(np.ones(5) * 0.5, size=400)
    y_true = rng.integers(0, 5, 400)
    bins = calibration_bins(y_true, prob, n_bins=10)
    confidence, correct = prob.max(axis=1), prob.argmax(axis=1) == y_true
    expected = 0.0
    for low, high in zip(np.linspace(0, 1, 11)[:-1], np.linspace(0, 1, 11)[1:]):
        mask = (confidence > low) & (confidence <= high)
        if mask.any():
            expected += mask.sum() / 400 * abs(correct[mask].mean() - confidence[mask].mean())
    assert bins["ece"] == pytest.approx(expected)
    assert bins["count"].sum() == 400


def test_per_class_table_is_sortable_and_complete(built):
    table = re.search(r'<table id="per-class-table" class="sortable">(.*?)</table>', built.html, re.S).group(1)
    assert table.count("<tr") == N_CLASSES + 1
    assert "addEventListener('click'" in built.html


def test_summary_markdown_and_table_rows(built):
    text = built.summary_markdown
    best = built.metrics["best_architecture"]
    assert f"**Best model:** `{best}`" in text
    assert f"s3://bucket/{layout.report_key('x')}" in text
    assert "failed: ResourceExhaustedError" in text and "\\|" in text  # pipe in the error escaped for the table
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + 4
    rows = {row["architecture"]: row for row in built.table_rows}
    assert rows[best]["best"] and rows["inceptionv3"]["status"] == "failed"
    assert rows[best]["weighted_f1"] == built.metrics["architectures"][best]["test"]["weighted_f1"]
    assert summary_markdown(built.metrics).count("Full report") == 0


def test_all_failed_still_builds_a_report():
    inputs = make_inputs(n_rows=50, n_classes=10, with_images=False)
    inputs.architectures = {"a": ArchResult(status="failed", error="boom"), "b": ArchResult(status="failed", error="bang")}
    inputs.tuning_trials = None
    inputs.retrain_decision = None
    report = build_report(inputs)
    assert report.metrics["best_architecture"] is None
    assert "No architecture finished successfully" in report.summary_markdown
    for section_id in SECTION_IDS:
        assert f'id="{section_id}"' in report.html
    assert "confusion_all_labels" not in report.figures


def test_flat_data_summary_keys_and_null_history_epochs_are_accepted():
    inputs = make_inputs(n_rows=60, n_classes=10, with_images=False)
    inputs.data_summary = {"rows": 100, "fetched_ok": 90, "failed_by_reason": {"http_404": 10},
                           "split_by_range": {"train": {"I-II": 50}, "test": {"V-VI": 40}}}
    for result in inputs.architectures.values():  # history.json writes NaN as null
        result.history = {"loss": [2.0, None, 1.5], "lr": [0.001] * 3, "val_weighted_f1": [0.1, 0.2, None]}
    report = build_report(inputs)
    assert {"fetch_outcomes", "split_by_range", "training_curves"} <= set(report.figures)
    assert report.metrics["duplicates"] is None
    assert "Duplicate and label-quality counts: not recorded" in report.html


def test_label_groups_order_the_confusion_matrix():
    inputs = make_inputs(n_rows=150, n_classes=30, with_images=False)
    names = inputs.architectures["resnet50"].class_names
    inputs.label_groups = {n: ("inflammatory" if i % 3 else "malignant epidermal") for i, n in enumerate(names)}
    order, groups = report_figures._label_order(inputs.architectures["resnet50"], inputs.label_groups)
    assert sorted(order.tolist()) == list(range(30))
    changes = sum(groups[i] != groups[i - 1] for i in range(1, len(groups)))
    assert changes == 1  # each group contiguous
    from dermflow.evaluation.figures import confusion_heatmap

    png = confusion_heatmap(np.eye(30)[order], [names[i] for i in order], title="grouped", groups=groups)
    assert Image.open(io.BytesIO(png)).format == "PNG"


HOSTILE = "<script>alert(1)</script>"


def test_hostile_labels_run_ids_and_errors_are_escaped():
    inputs = make_inputs(n_rows=60, n_classes=8, with_images=False)
    inputs.run_id = f"run-{HOSTILE}"
    for result in inputs.architectures.values():
        if result.status == "ok":
            result.class_names = [HOSTILE, *list(result.class_names)[1:]]
    inputs.architectures[HOSTILE] = ArchResult(status="failed", error=f"{HOSTILE} & <b>bold</b>")
    inputs.params = {"note": HOSTILE, "nested": {"value": HOSTILE}}
    inputs.data_summary = {**inputs.data_summary, "dropped_labels": [HOSTILE]}
    inputs.retrain_decision = {**inputs.retrain_decision, "reason": HOSTILE}
    page = build_report(inputs).html
    assert HOSTILE not in page and "<b>bold</b>" not in page
    assert page.count("<script>") == 1  # the page's own sorting script, nothing injected
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "&amp; &lt;b&gt;" in page
    assert "<title>dermflow report run-&lt;script&gt;" in page


def test_bad_predictions_name_the_architecture():
    inputs = make_inputs(n_rows=40, n_classes=10, with_images=False)
    broken = inputs.architectures["resnet50"]
    broken.class_names = broken.class_names[:-1]
    with pytest.raises(ReportInputError, match="resnet50.*test") as raised:
        build_report(inputs)
    assert not is_transient(raised.value)  # the report task must not retry it
    with pytest.raises(ReportInputError, match="md5hash has 2 rows"):
        Predictions(y_true=[0, 1, 2], y_prob=np.eye(3), md5hash=["a", "b"], fitzpatrick_range=["I-II"] * 3)
    buffer = io.BytesIO()
    np.savez(buffer, md5hash=np.array(["a"]), split=np.array(["test"]), y_true=np.array([0]))
    with pytest.raises(ReportInputError, match=r"lacks arrays: \['fitzpatrick_range', 'y_prob'\]"):
        predictions_from_npz(buffer.getvalue())


def test_predictions_from_npz_splits_by_split():
    buffer = io.BytesIO()
    np.savez(buffer, md5hash=np.array(["a", "b", "c"]), split=np.array(["test", "verified_test", "test"]),
             y_true=np.array([0, 1, 1]), y_prob=np.eye(3, 2, dtype=np.float32), fitzpatrick_range=np.array(["I-II"] * 3))
    splits = predictions_from_npz(buffer.getvalue())
    assert set(splits) == {"test", "verified_test"}
    assert splits["test"].md5hash.tolist() == ["a", "c"]
    assert splits["verified_test"].y_true.tolist() == [1]


class MemoryStore:
    """What write_report needs of an ObjectStore."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, str | None]] = {}

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        self.objects[key] = (data, content_type)
        return f"s3://bucket/{key}"


def test_write_report_lays_out_the_run_folder(built):
    store = MemoryStore()
    run_id = "20261126-101500-brave-otter"
    uris = report_module.write_report(built, store, run_id)
    report_key, metrics_key = layout.report_key(run_id), layout.run_metrics_key(run_id)
    assert uris["report"] == f"s3://bucket/{report_key}"
    assert uris["metrics"] == f"s3://bucket/{metrics_key}"
    assert set(store.objects) == {report_key, metrics_key, *(layout.figure_key(run_id, name) for name in built.figures)}
    assert all(key.startswith(layout.run_prefix(run_id)) for key in store.objects)
    assert store.objects[report_key][1].startswith("text/html")
    assert json.loads(store.objects[metrics_key][0]) == built.metrics
    assert store.objects[layout.figure_key(run_id, "calibration")] == (built.figures["calibration"], "image/png")
    with pytest.raises(ValueError, match="run_id"):
        report_module.write_report(built, store, "a/b")


def test_build_time_at_full_size_is_reasonable():
    import time

    inputs = make_inputs(seed=1, n_rows=3000)
    for extra in ("densenet121", "vgg16"):
        inputs.architectures[extra] = inputs.architectures["resnet50"]
    started = time.perf_counter()
    report = build_report(inputs)
    elapsed = time.perf_counter() - started
    assert len(report.metrics["architectures"]) == 6
    # 5-6 s on an idle 2-core box, ~20 s while four other test suites share it: catches a 10x regression
    assert elapsed < 60, f"report took {elapsed:.1f} s"


def test_the_watermark_check_reads_the_best_models_example_heatmaps():
    """Heat along the bottom edge is flagged on the page and in the summary artifact; heat on the
    image's upper part is not; without maps there is no check."""
    from dataclasses import replace

    def bottom_heavy(md5: str) -> np.ndarray:
        heat = np.full((20, 20), 0.02)
        heat[-3:, :] = 1.0
        return heat

    flagged = build_report(replace(make_inputs(seed=3), saliency=bottom_heavy))
    check = flagged.metrics["watermark_check"]
    assert check["architecture"] == flagged.metrics["best_architecture"] and check["leans_on_strip"]
    assert check["images"] >= 1 and check["ratio_to_area"] > 3
    assert "Watermark check:" in flagged.summary_markdown and "may lean on the watermark" in flagged.summary_markdown
    assert 'class="bad" id="watermark-check"' in flagged.html and "edge_mask" in flagged.html

    calm = build_report(make_inputs(seed=3))  # the fixture's maps peak in the upper half
    assert not calm.metrics["watermark_check"]["leans_on_strip"]
    assert "does not gather on the watermark" in calm.summary_markdown
    assert 'class="muted" id="watermark-check"' in calm.html

    none = build_report(make_inputs(seed=3, with_images=False))
    assert none.metrics["watermark_check"] is None and "Watermark check" not in none.summary_markdown
    assert 'id="watermark-check"' not in none.html
    json.dumps(flagged.metrics, allow_nan=False)  # metrics.json stays strict JSON
