"""Quality bench: the tuned recipe against the student report's own recipe on real images.

On ../shared/data/atlas20 (20 conditions), with a fixed stratified split (seed 0: 20 %
held-out test, 15 % validation, the rest training), both recipes get the same wall-clock
budget on this machine (`--budget-minutes`, default 15) at the same image size (`--image-size`,
default the run's; the figures in bench/README.md were measured at 128), from random
initialisation (weights=none), and are scored by weighted F1 on the same held-out images:

- report: `baseline_cnn` as the registry builds it, Adam 1e-3, plain cross-entropy, no class
  weights, early stopping on validation loss (patience 5, best weights restored), stopped at
  the budget.
- tuned: the pipeline without Prefect: `dermflow.modeling.tuning.tune_architecture` (random search, the
  tuning share of the budget), then `dermflow.modeling.train.train_architecture` with the best trial's
  TrainConfig override until the budget ends: the same calls `derm-tune` and `derm-train` make,
  on an embedded SeaweedFS bucket.

Prints both weighted F1s and their ratio, and writes them as JSON (`--out`).
Run: `.venv/bin/python bench/bench_quality.py [--budget-minutes 15] [--recipe both|report|tuned]`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ATLAS_DIR = PROJECT_ROOT.parent / "shared" / "data" / "atlas20"

from dermflow import config  # noqa: E402 - Keras-free: the defaults of the tuned recipe
from dermflow import layout  # noqa: E402

SEARCH_DEFAULTS = config.SearchOptions()


def fixed_split(rows, seed: int = 0):
    """Stratified by condition: 20 % test (held out), 15 % val, the rest train."""
    from sklearn.model_selection import train_test_split

    rows = rows.copy()
    rest, test = train_test_split(rows.index, test_size=0.20, stratify=rows["label"], random_state=seed)
    train, val = train_test_split(rest, test_size=0.15 / 0.80, stratify=rows.loc[rest, "label"], random_state=seed)
    rows["split"] = "train"
    rows.loc[val, "split"] = "val"
    rows.loc[test, "split"] = "test"
    return rows


def manifest(atlas_dir: Path):
    import pandas as pd

    rows = pd.read_csv(atlas_dir / "rows.csv", dtype=str, keep_default_na=False)
    rows = fixed_split(rows)
    rows["fitzpatrick_range"] = "unknown"
    rows["key"] = rows["md5hash"].map(layout.image_key)
    return rows[["md5hash", "label", "fitzpatrick_scale", "fitzpatrick_range", "qc", "split", "key"]]


def run_report_recipe(frame, atlas_dir: Path, image_size: int, budget_s: float, cache_dir: Path, seed: int) -> dict:
    import keras
    import numpy as np

    from dermflow.dataset import arrays as data_lib
    from dermflow.modeling import models
    from dermflow.metrics import weighted_f1
    from dermflow.modeling.callbacks import TimeBudget

    started = time.time()
    class_names = sorted(frame.loc[frame["split"] == "train", "label"].unique())
    arrays = data_lib.prepare_split_arrays(frame, lambda md5: atlas_dir / "images" / f"{md5}.jpg", image_size,
                                           cache_dir, class_names)
    keras.utils.set_random_seed(seed)
    model = models.create_model("baseline_cnn", len(class_names), image_size, "none", seed=seed)
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
    train = data_lib.make_dataset(arrays, arrays.indices("train"), 32, shuffle=True, seed=seed)
    val = data_lib.make_dataset(arrays, arrays.indices("val"), 64, shuffle=False)
    stop = keras.callbacks.EarlyStopping("val_loss", patience=5, restore_best_weights=True)
    history = model.fit(train, validation_data=val, epochs=200, verbose=2,
                        callbacks=[stop, TimeBudget(started + budget_s)])
    test_idx = arrays.indices("test")
    probs = model.predict(data_lib.make_dataset(arrays, test_idx, 64, shuffle=False), verbose=0)
    score = weighted_f1(arrays.labels[test_idx], np.asarray(probs).argmax(axis=1))
    return {"weighted_f1": score, "epochs": len(history.history["loss"]), "seconds": round(time.time() - started, 1)}


def run_tuned_recipe(frame, atlas_dir: Path, image_size: int, budget_s: float, workdir: Path, seed: int,
                     tuner: str, max_trials: int, share: float, epochs: int | None = None) -> dict:
    from dermflow.modeling import train as train_lib
    from dermflow.modeling import tuning
    from dermflow.modeling.tuning_results import trial_table
    from dermflow.settings import load_settings
    from dermflow.ops.stack import SeaweedServer, free_port_block
    from dermflow.storage import ObjectStore

    server = SeaweedServer(data_dir=workdir / "seaweed", s3_port=free_port_block(4),
                           access_key="bench-" + secrets.token_hex(4), secret_key=secrets.token_hex(16))
    server.start()
    try:
        settings = load_settings(aws_endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
                                 aws_secret_access_key=server.secret_key, bucket="bench",
                                 cache_dir=workdir / "cache")
        store = ObjectStore.from_settings(settings)
        store.ensure_bucket()
        for md5 in frame["md5hash"]:
            store.put_file(layout.image_key(md5), atlas_dir / "images" / f"{md5}.jpg")
        split_key = layout.split_manifest_key("bench")
        store.put_dataframe_csv(split_key, frame)

        started = time.time()  # the budget starts when the data is in the bucket, as in derm
        deadline = started + budget_s
        # as derm/full does: as many epochs as the budget allows unless given
        epochs = config.RunConfig.from_parameters(epochs=epochs, budget_minutes=budget_s / 60).final_epochs()
        batch_size = config.TRAIN_DEFAULTS.batch_size
        train_params = {"image_size": image_size, "epochs": epochs, "batch_size": batch_size, "weights": "none",
                        "seed": seed}
        tuned = tuning.tune_architecture(
            store, split_key, "baseline_cnn", tuner=tuner, max_trials=max_trials,
            epochs=train_params["epochs"], image_size=image_size, batch_size=batch_size, weights="none", seed=seed,
            deadline=tuning.tuning_deadline(deadline, share, started), settings=settings,
            tuning_id=f"bench-{secrets.token_hex(3)}",
        )
        tuning_seconds = time.time() - started
        best = tuned["best"] or {}
        train_config = config.TrainConfig(**{**train_params, "architecture": "baseline_cnn", "deadline": deadline, **best})
        summary = train_lib.train_architecture(store, split_key, train_config, "20260101-000000-bench", settings=settings)
        return {
            "weighted_f1": summary["test"]["weighted_f1"], "best": best,
            "trials": trial_table(tuned["trials"]), "tuning_seconds": round(tuning_seconds, 1),
            "final_epochs": summary["epochs_run"], "final_status": summary["status"],
            "seconds": round(time.time() - started, 1),
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atlas", type=Path, default=ATLAS_DIR)
    parser.add_argument("--budget-minutes", type=float, default=15.0)
    parser.add_argument("--image-size", type=int, default=config.TRAIN_DEFAULTS.image_size)
    parser.add_argument("--recipe", choices=("both", "report", "tuned"), default="both")
    parser.add_argument("--tuner", default=SEARCH_DEFAULTS.tuner)
    parser.add_argument("--max-trials", type=int, default=SEARCH_DEFAULTS.max_trials)
    parser.add_argument("--tuning-share", type=float, default=None)
    parser.add_argument("--seed", type=int, default=config.TRAIN_DEFAULTS.seed)
    parser.add_argument("--epochs", type=int, default=None,
                        help="final training epochs (default: as many as the budget allows, as in derm/full)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (args.atlas / "rows.csv").exists():
        print(f"{args.atlas} is absent: this bench needs ../shared/data/atlas20", file=sys.stderr)
        return 2
    share = args.tuning_share or config.DEFAULT_TUNING_SHARE
    frame = manifest(args.atlas)
    budget_s = args.budget_minutes * 60
    results: dict = {"budget_minutes": args.budget_minutes, "image_size": args.image_size,
                     "split_sizes": frame["split"].value_counts().to_dict()}
    with tempfile.TemporaryDirectory(prefix="dermflow-bench-") as tmp:
        workdir = Path(tmp)
        if args.recipe in ("both", "report"):
            results["report"] = run_report_recipe(frame, args.atlas, args.image_size, budget_s, workdir / "arrays",
                                                  args.seed)
            print(f"report recipe: weighted F1 {results['report']['weighted_f1']:.4f}", flush=True)
        if args.recipe in ("both", "tuned"):
            results["tuned"] = run_tuned_recipe(frame, args.atlas, args.image_size, budget_s, workdir, args.seed,
                                                args.tuner, args.max_trials, share, args.epochs)
            print(f"tuned recipe: weighted F1 {results['tuned']['weighted_f1']:.4f}", flush=True)
    if "report" in results and "tuned" in results:
        report, tuned = results["report"]["weighted_f1"], results["tuned"]["weighted_f1"]
        results["ratio"] = tuned / report if report > 0 else float("inf")
        print(f"held-out weighted F1: report {report:.4f}, tuned {tuned:.4f}, ratio {results['ratio']:.2f}")
    print(json.dumps(results, indent=2, default=str))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
