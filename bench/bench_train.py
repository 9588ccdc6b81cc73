"""Training throughput through the real input pipeline versus in-memory tensors.

Reads the atlas20 images straight from ../shared/data/atlas20 (no S3) into the same cache
and uint8 array path `train_architecture` uses (`dermflow.dataset.arrays.prepare_split_arrays`), then for
each architecture times `fit` steps fed by `dermflow.dataset.arrays.make_dataset` (tf.data over the
memmap, or the PyDataset under a non-TensorFlow Keras backend) and fed by the same images
already in memory as float32 arrays, in alternating rounds on one compiled model. Prints
images/s for both, their ratio (goal >= 0.95) and the implied seconds per training epoch.

    make bench-train      # or: .venv/bin/python bench/bench_train.py [--size N] [--archs ...]

`--size` and `--batch-size` default to the run's (`dermflow.config.TrainConfig`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dermflow.config import TRAIN_DEFAULTS  # noqa: E402 - Keras-free


def atlas_split(atlas: Path, seed: int) -> pd.DataFrame:
    """A stratified 70/15/15 train/val/test split of the atlas rows (stand-in for dermflow.dataset.split)."""
    rows = pd.read_csv(atlas / "rows.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    split = np.empty(len(rows), dtype=object)
    for _, index in rows.groupby("label").indices.items():
        index = rng.permutation(index)
        n_val = n_test = max(1, round(0.15 * len(index)))
        split[index[:n_val]] = "val"
        split[index[n_val : n_val + n_test]] = "test"
        split[index[n_val + n_test :]] = "train"
    rows["split"] = split
    rows["fitzpatrick_range"] = "unknown"
    return rows[["md5hash", "label", "split", "fitzpatrick_range"]]


class StepClock:
    """Timestamps of training batch ends, so a measurement excludes fit's set-up and the
    iterator start (which would bias whichever input is timed first)."""

    def __init__(self):
        import keras

        class Clock(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.ends: list[float] = []

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())

        self.callback = Clock()


def timed_fit(model, steps: int, **fit_args) -> float:
    """Seconds per step over steps 2..steps of one `fit` (the first step absorbs the start)."""
    clock = StepClock().callback
    fit_args.setdefault("shuffle", False)  # datasets shuffle themselves
    model.fit(epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[clock], **fit_args)
    ends = clock.ends
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atlas", type=Path, default=PROJECT_ROOT.parent / "shared" / "data" / "atlas20")
    parser.add_argument("--size", type=int, default=TRAIN_DEFAULTS.image_size)
    parser.add_argument("--archs", default="baseline_cnn,resnet50v2")
    parser.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS.batch_size)
    parser.add_argument("--steps", default="baseline_cnn=12,resnet50v2=4", help="timed steps per round, per architecture")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def in_memory_inputs(arrays, train_idx, weights, args) -> dict:
    """`fit` arguments feeding the same training images from memory (the baseline)."""
    import keras

    x = np.asarray(arrays.images[train_idx], dtype=np.float32)
    y = np.eye(len(arrays.class_names), dtype=np.float32)[arrays.labels[train_idx]]
    w = weights[arrays.labels[train_idx]].astype(np.float32)
    if keras.backend.backend() != "tensorflow":
        return dict(x=x, y=y, sample_weight=w, batch_size=args.batch_size, shuffle=True)
    import tensorflow as tf

    # the same images already in memory as tensors, shuffled and batched
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y, w))
        .shuffle(len(train_idx), seed=args.seed).batch(args.batch_size).repeat().prefetch(tf.data.AUTOTUNE)
    )
    return dict(x=dataset)


def measure(name: str, arrays, train_idx, weights, memory_args: dict, steps: int, args) -> tuple[float, float]:
    """Images/s of architecture `name` fed by the pipeline and from memory (median of rounds)."""
    import keras

    from dermflow.config import TrainConfig
    from dermflow.dataset import arrays as data_lib
    from dermflow.modeling import models
    from dermflow.modeling.recipe import accelerator_present, compile_model

    config = TrainConfig(architecture=name, image_size=args.size, batch_size=args.batch_size, weights="none")
    model = models.create_model(name, len(arrays.class_names), args.size, weights="none", seed=args.seed)
    jit = accelerator_present() or keras.backend.backend() == "jax"
    compile_model(model, config, config.learning_rate, jit_compile=jit)
    pipeline = data_lib.make_dataset(arrays, train_idx, args.batch_size, shuffle=True, seed=args.seed, class_weights=weights)
    if keras.backend.backend() == "tensorflow":
        pipeline = pipeline.repeat()
    else:
        steps = min(steps, len(pipeline) - 1)  # a PyDataset restarts at batch 0 on every fit
    # warm-up: trace/compile both input signatures before timing
    timed_fit(model, 2, x=pipeline)
    timed_fit(model, 2, **memory_args)
    pipeline_s, memory_s = [], []
    for round_index in range(args.rounds):
        # alternate which input goes first, so neither gets a systematic position
        order = ("pipeline", "memory") if round_index % 2 == 0 else ("memory", "pipeline")
        for which in order:
            if which == "pipeline":
                pipeline_s.append(timed_fit(model, steps + 1, x=pipeline))
            else:
                memory_s.append(timed_fit(model, steps + 1, **memory_args))
    return args.batch_size / float(np.median(pipeline_s)), args.batch_size / float(np.median(memory_s))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.atlas / "rows.csv").exists():
        print(f"{args.atlas} is absent (../shared not beside the project); nothing to measure", file=sys.stderr)
        return 2

    import keras

    from dermflow.dataset import arrays as data_lib
    from dermflow.modeling.recipe import accelerator_present
    from dermflow.settings import get_settings

    cache_dir = args.cache_dir or get_settings().local_cache_dir / "bench"
    frame = atlas_split(args.atlas, args.seed)
    started = time.perf_counter()
    arrays = data_lib.prepare_split_arrays(
        frame, lambda md5: args.atlas / "images" / f"{md5}.jpg", args.size, cache_dir
    )
    prepare_s = time.perf_counter() - started
    train_idx = arrays.indices("train")
    weights = data_lib.class_weights_from_labels(arrays.labels[train_idx], len(arrays.class_names))
    gpu = accelerator_present()
    if gpu:
        keras.config.set_dtype_policy("mixed_float16")
    print(f"backend {keras.backend.backend()}, accelerator {gpu}, {len(train_idx)} training images of "
          f"{len(arrays.labels)} at {args.size}px, {len(arrays.class_names)} classes; array ready in {prepare_s:.1f} s "
          f"({arrays.array_path})")

    steps_of = dict(item.split("=") for item in args.steps.split(",") if "=" in item)
    memory_args = in_memory_inputs(arrays, train_idx, weights, args)
    print(f"{'architecture':<14} {'pipeline img/s':>15} {'in-memory img/s':>16} {'ratio':>6} {'s/epoch':>8}")
    for name in args.archs.split(","):
        pipeline_rate, memory_rate = measure(name, arrays, train_idx, weights, memory_args,
                                             int(steps_of.get(name, 10)), args)
        epoch_s = len(train_idx) / pipeline_rate
        print(f"{name:<14} {pipeline_rate:>15.1f} {memory_rate:>16.1f} {pipeline_rate / memory_rate:>6.3f} {epoch_s:>8.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
