"""GPU check of the training core on the Keras JAX backend (GPU images ship JAX, not TensorFlow).

Prints, for every registered architecture, that one training step runs on the GPU with finite
outputs; then for resnet50v2 at 224 px with mixed precision and XLA: training images/s through
the real input pipeline (memmap -> keras.utils.PyDataset) and from in-memory arrays, their
ratio, for the transfer-learning phases (warm-up, fine-tune with BatchNorm frozen, with the
validation weighted-F1 callback) and for the whole network trainable. Synthetic pixels: only throughput is measured here.

    KERAS_BACKEND=jax python bench/bench_gpu.py [--images 2048] [--epochs 2] [--sections steps,phases,whole]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=114)
    parser.add_argument("--sections", default="steps,phases,whole",
                        help="comma-separated: steps (every architecture), phases (warm-up, fine-tune), whole")
    return parser.parse_args()


def every_architecture_steps(rng) -> None:
    """One training step of every registered architecture at its minimum size."""
    import keras
    import numpy as np

    from dermflow.modeling import models

    for name in models.list_architectures():
        size = models.effective_image_size(name, 32)
        model = models.create_model(name, 5, size, weights="none")
        model.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=True)
        x = rng.integers(0, 255, (4, size, size, 3)).astype("float32")
        y = keras.utils.to_categorical(rng.integers(0, 5, 4), 5)
        start = time.perf_counter()
        loss = model.train_on_batch(x, y)
        out = np.asarray(model.predict(x, verbose=0), dtype=np.float32)
        ok = out.shape == (4, 5) and np.isfinite(out).all() and np.isfinite(loss)
        print(f"step {name:18} size={size:3} ok={ok} loss={float(np.ravel(loss)[0]):.3f} "
              f"({time.perf_counter() - start:.1f}s incl. compile)", flush=True)


def synthetic_arrays(args, rng, size: int):
    """`args.images` random images as a memmapped SplitArrays, 85 % train, 15 % val."""
    import numpy as np

    from dermflow.dataset import arrays as data_lib

    n = args.images
    work = Path(tempfile.mkdtemp())
    pixels = np.lib.format.open_memmap(work / "arrays.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    for start in range(0, n, 256):
        pixels[start:start + 256] = rng.integers(0, 255, (min(256, n - start), size, size, 3), dtype=np.uint8)
    pixels.flush()
    return data_lib.SplitArrays(
        images=np.load(work / "arrays.npy", mmap_mode="r"), labels=rng.integers(0, args.classes, n),
        md5hash=np.array([f"{i:032x}" for i in range(n)]), split=np.where(np.arange(n) < int(n * 0.85), "train", "val"),
        fitzpatrick_range=np.array(["I-II"] * n), class_names=[f"c{i}" for i in range(args.classes)],
        image_size=size, array_path=work / "arrays.npy", digest="bench",
    )


def main() -> int:
    args = parse_args()
    sections = set(args.sections.split(","))

    import keras
    import numpy as np

    from dermflow.config import TrainConfig
    from dermflow.dataset import arrays as data_lib
    from dermflow.modeling import models
    from dermflow.modeling.recipe import accelerator_present, compile_model

    print(f"backend={keras.backend.backend()} accelerator={accelerator_present()}", flush=True)
    if keras.backend.backend() == "jax":
        import jax

        print("devices:", jax.devices(), flush=True)
    keras.mixed_precision.set_global_policy("mixed_float16" if accelerator_present() else "float32")
    rng = np.random.default_rng(0)

    # 1. every registered architecture: one training step at its minimum size
    if "steps" in sections:
        every_architecture_steps(rng)

    # 2. resnet50v2 at 224 px, mixed precision: pipeline vs in-memory throughput
    size = 224
    arrays = synthetic_arrays(args, rng, size)
    train_idx = arrays.indices("train")
    config = TrainConfig(architecture="resnet50v2", image_size=size, weights="none", batch_size=args.batch_size)
    model = models.create_model("resnet50v2", args.classes, size, weights="none")

    def timed_fit(inputs, targets=None, epochs=args.epochs, **kwargs) -> float:
        model.fit(inputs, targets, epochs=1, verbose=0, **kwargs)  # compile and warm up
        start = time.perf_counter()
        model.fit(inputs, targets, epochs=epochs, verbose=0, **kwargs)
        return len(train_idx) * epochs / (time.perf_counter() - start)

    dataset = data_lib.make_dataset(arrays, train_idx, args.batch_size, shuffle=True)
    x_mem = np.asarray(arrays.images[train_idx], dtype=np.float32)
    y_mem = keras.utils.to_categorical(arrays.labels[train_idx], args.classes)
    if "phases" in sections:
        transfer_learning_phases(args, arrays, model, config, dataset, x_mem, y_mem, timed_fit)

    if "whole" in sections:
        # Every layer trainable: the cost of training resnet50v2 from scratch (weights=none).
        model.trainable = True
        compile_model(model, config, config.learning_rate, jit_compile=True)
        whole_ips = timed_fit(dataset)
        whole_memory_ips = timed_fit(x_mem, y_mem, batch_size=args.batch_size)
        print(f"whole network trainable: pipeline {whole_ips:.0f} img/s, in-memory {whole_memory_ips:.0f} img/s, "
              f"ratio {whole_ips / whole_memory_ips:.3f}", flush=True)
    return 0


def transfer_learning_phases(args, arrays, model, config, dataset, x_mem, y_mem, timed_fit) -> None:
    import keras

    from dermflow.dataset import arrays as data_lib
    from dermflow.modeling.callbacks import ValWeightedF1
    from dermflow.modeling.recipe import configure_phase

    train_idx, val_idx = arrays.indices("train"), arrays.indices("val")
    configure_phase(model, "warmup", config, jit_compile=True)
    pipeline_ips = timed_fit(dataset)
    memory_ips = timed_fit(x_mem, y_mem, batch_size=args.batch_size)
    print(f"resnet50v2 224px mixed precision, warm-up phase (frozen backbone): "
          f"pipeline {pipeline_ips:.0f} img/s, in-memory {memory_ips:.0f} img/s, "
          f"ratio {pipeline_ips / memory_ips:.3f}", flush=True)

    configure_phase(model, "finetune", config, jit_compile=True)
    frozen_bn = all(not layer.trainable for layer in model.get_layer("backbone").layers
                    if isinstance(layer, keras.layers.BatchNormalization))
    val = data_lib.make_dataset(arrays, val_idx, args.batch_size, shuffle=False)
    callback = ValWeightedF1(val, arrays.labels[val_idx])
    start = time.perf_counter()
    history = model.fit(dataset, epochs=1, verbose=0, callbacks=[callback])
    finetune_ips = len(train_idx) / (time.perf_counter() - start)
    print(f"fine-tune phase (top of backbone, BatchNorm frozen={frozen_bn}): {finetune_ips:.0f} img/s incl. "
          f"compile; val_weighted_f1={history.history['val_weighted_f1'][-1]:.4f}", flush=True)
    configure_phase(model, "finetune", config, jit_compile=True)
    full_ips = timed_fit(dataset)
    print(f"fine-tune phase steady state: pipeline {full_ips:.0f} img/s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
