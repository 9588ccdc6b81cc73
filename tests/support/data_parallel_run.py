"""Train the tiny unit split once on one device and once data-parallel over every device this
process sees; print both runs' held-out probabilities as JSON. Run in a subprocess under
KERAS_BACKEND=jax and XLA_FLAGS=--xla_force_host_platform_device_count=2
(tests/unit/test_train_gpu.py): the device count is fixed when JAX starts."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    import jax

    from dermflow import layout
    from dermflow.config import TrainConfig
    from dermflow.modeling import train
    from dermflow.settings import load_settings
    from tests.support.memory_s3 import memory_store
    from tests.unit import test_train_steps as steps

    out = {"devices": [str(d) for d in jax.devices()]}
    for name, parallel in (("single", False), ("parallel", True)):
        store = memory_store()
        # 12 training images in batches of 6: every batch splits evenly over 2 devices, so
        # both runs see the same batches
        steps.SIZES.update({"train": 4, "val": 2, "test": 2})
        steps.put_split(store)
        with tempfile.TemporaryDirectory() as cache:
            config = TrainConfig(architecture="baseline_cnn", image_size=32, epochs=2, batch_size=6, weights="none",
                                 augment=False, dropout=0.0, class_weights=False, eval_batch_size=6,
                                 data_parallel=parallel)
            summary = train.train_architecture(store, steps.SPLIT_KEY, config, f"20260101-000000-{name}",
                                               load_settings(cache_dir=Path(cache)))
            params = store.get_json(layout.model_key(f"20260101-000000-{name}", "baseline_cnn", "params.json"))
            path = Path(cache) / "p.npz"
            path.write_bytes(store.get_bytes(summary["keys"]["predictions"]))
            probs = np.load(path)["y_prob"]
        out[name] = {"y_prob": probs.tolist(), "data_parallel_devices": params["device"]["data_parallel_devices"],
                     "throughput": summary["throughput"]}
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
