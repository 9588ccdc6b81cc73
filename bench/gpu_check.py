"""The one short device check of issue 16: the training core as a `derm-train` flow run calls
it, on whatever accelerator this machine has, under KERAS_BACKEND=jax (GPU machines ship JAX,
not TensorFlow; no package index, no ImageNet download: weights are random, which does not
change the speed).

For each architecture (default: resnet50v2 at 224 px, then efficientnetv2_b0, then
baseline_cnn): the devices the trainer sees (`dermflow.modeling.devices`), then
`build_or_resume` -> `run_phases` (the recipe's phases, the validation weighted-F1 callback,
per-epoch checkpoints to an in-memory bucket) -> `evaluate_best_epoch`, all fed by the real
input pipeline (`dermflow.dataset.arrays`: a memmap of generated uint8 images read through the
PyDataset), mixed precision (`--tiny`: float32) and XLA on. Prints one JSON line per architecture (`RESULT {...}`)
with training images/s per epoch (the first includes XLA compilation), the steady figure, and
inference images/s. `--data-parallel` also trains resnet50v2 over every visible GPU.

    KERAS_BACKEND=jax python bench/gpu_check.py [--images 4096] [--epochs 3] [--batch-size 128]
    python bench/gpu_check.py --tiny      # a CPU smoke run: 64 images at 32 px, 1 epoch each
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The reference and goal for resnet50v2 at 224 px on one H100.
MEASURED_BEFORE = 4080
GOAL = 5600


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--architectures", default="resnet50v2,efficientnetv2_b0,baseline_cnn")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3, help="warm-up 1 + fine-tune for pretrained architectures")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=114)
    parser.add_argument("--data-parallel", action="store_true", help="also resnet50v2 over every visible GPU")
    parser.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false",
                        help="float32 (XLA's float16 on a CPU is very slow)")
    parser.add_argument("--tiny", action="store_true",
                        help="64 images at 32 px, 2 epochs, float32: a smoke run of the same path on a CPU")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.image_size, args.epochs, args.batch_size, args.classes = 64, 32, 2, 16, 5
        args.mixed_precision = False
    return args


def synthetic_arrays(n: int, size: int, classes: int, seed: int = 0):
    """`n` generated images as the memmapped SplitArrays training reads: 80 % train, 10 % val,
    10 % test."""
    import numpy as np

    from dermflow.dataset import arrays as data_lib

    rng = np.random.default_rng(seed)
    work = Path(tempfile.mkdtemp(prefix="dermflow-gpu-check-"))
    pixels = np.lib.format.open_memmap(work / "arrays.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    for start in range(0, n, 256):
        pixels[start:start + 256] = rng.integers(0, 255, (min(256, n - start), size, size, 3), dtype=np.uint8)
    pixels.flush()
    split = np.where(np.arange(n) < int(n * 0.8), "train", np.where(np.arange(n) < int(n * 0.9), "val", "test"))
    return data_lib.SplitArrays(
        images=np.load(work / "arrays.npy", mmap_mode="r"), labels=rng.integers(0, classes, n),
        md5hash=np.array([f"{i:032x}" for i in range(n)]), split=split,
        fitzpatrick_range=np.array(["I-II"] * n), class_names=[f"c{i}" for i in range(classes)],
        image_size=size, array_path=work / "arrays.npy", digest="gpu-check",
    )


def check(architecture: str, args, data_parallel: bool = False) -> dict:
    """One architecture through the training core; its figures."""
    from dermflow.config import TrainConfig
    from dermflow.modeling import models, train
    from dermflow.modeling.checkpoints import CheckpointManager
    from dermflow.modeling.placement import check_placement
    from tests.support.memory_s3 import memory_store

    size = models.effective_image_size(architecture, args.image_size)
    arrays = synthetic_arrays(args.images, size, args.classes)
    config = TrainConfig(architecture=architecture, image_size=size, epochs=args.epochs, batch_size=args.batch_size,
                         eval_batch_size=args.batch_size, weights="none", warmup_epochs=1, mixed_precision=args.mixed_precision,
                         jit_compile=True, class_weights=False, data_parallel=data_parallel)
    data = train.PreparedData(arrays, list(arrays.class_names), size, None)
    run_id = f"20260101-000000-gpu-check-{architecture.replace('_', '-')}"
    manager = CheckpointManager(memory_store(), run_id, architecture, Path(tempfile.mkdtemp()) / "ckpt", keep=1)
    placement = check_placement(config, None)
    runtime = train.Runtime(accelerator=placement.device["accelerator"], mixed_precision=args.mixed_precision,
                            jit_compile=True)
    started = time.perf_counter()
    config, (start, status, evaluation) = train.train_with_oom_retry(manager, config, data, run_id, runtime,
                                                                     placement, None)
    n_train = len(arrays.indices("train"))
    return {
        "architecture": architecture, "image_size": size, "batch_size": config.batch_size,
        "mixed_precision": args.mixed_precision,
        "data_parallel_devices": placement.device["data_parallel_devices"],
        "devices": placement.device["devices"], "backend": placement.device["backend"],
        "train_images": n_train, "epoch_seconds": [round(s, 2) for s in placement.timer.seconds],
        "epoch_images_per_second": [round(n_train / s, 1) for s in placement.timer.seconds],
        **placement.throughput(n_train, evaluation), "oom_retry": placement.oom_retry, "status": status,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    import keras

    args = parse_args()
    from dermflow.modeling.devices import describe_devices

    print("DEVICES " + json.dumps(describe_devices()), flush=True)
    runs = [(name, False) for name in args.architectures.split(",") if name]
    if args.data_parallel:
        runs.append(("resnet50v2", True))
    for name, parallel in runs:
        result = check(name, args, parallel)
        if name == "resnet50v2" and args.image_size == 224 and not parallel:
            result["reference"] = {"measured_before": MEASURED_BEFORE, "goal": GOAL}
        print("RESULT " + json.dumps(result), flush=True)
        keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    sys.exit(main())
