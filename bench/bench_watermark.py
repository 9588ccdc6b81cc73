"""Watermark bench: does a trained model lean on the image host's bottom-edge watermark?

atlas20's photos carry the host's "SFS" watermark along the bottom edge (issue 17: the report's
Grad-CAM examples of the most frequent errors put the heat there, not on the lesion). For each
model given (a `.keras` file trained on the bench split of `bench_quality.py`, e.g. from
`bench_quality.py --keep-models DIR`), on the same held-out images:

- held-out weighted F1 as is, with the bottom strip (`--strip`, a fraction of the height)
  masked to the image's mean colour, and with the four corners masked likewise;
- Grad-CAM mass inside the bottom strip, as a share of the whole map, against the strip's
  share of the area (a ratio over 1 means the heat gathers on the strip).

A model that leans on the watermark loses F1 when the strip is masked and puts more than its
area's share of Grad-CAM mass there. Prints a table and writes JSON (`--out`).
Run: `.venv/bin/python bench/bench_watermark.py --models DIR/*.keras [--image-size 128]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.bench_quality import ATLAS_DIR, manifest  # noqa: E402
from dermflow.evaluation.saliency import WATERMARK_STRIP  # noqa: E402


def masked(images, strip: float, where: str):
    """Copies of uint8 images (n, h, w, 3) with the bottom strip or the four corners set to
    each image's mean colour (a flat patch carries no watermark and no lesion)."""
    import numpy as np

    out = np.array(images, dtype=np.float32, copy=True)
    n, height, width, _ = out.shape
    mean = out.mean(axis=(1, 2), keepdims=True)
    rows = max(1, int(round(height * strip)))
    cols = max(1, int(round(width * strip)))
    if where == "bottom":
        out[:, height - rows:, :, :] = mean
    else:
        for r in (slice(0, rows), slice(height - rows, height)):
            for c in (slice(0, cols), slice(width - cols, width)):
                out[:, r, c, :] = mean[:, 0:1, 0:1, :]
    return out


def strip_mass(model, images, strip: float, limit: int) -> dict:
    """Mean share of Grad-CAM mass inside the bottom strip over `limit` images, and that
    share divided by the strip's share of the area (`saliency.strip_saliency`, the arithmetic
    the run report's watermark check uses)."""
    from dermflow.evaluation.saliency import grad_cam, strip_saliency

    check = strip_saliency((grad_cam(model, image) for image in images[:limit]), strip)
    if check is None:
        return {"images": 0, "strip_share": float("nan"), "ratio_to_area": float("nan")}
    return check


def score(model, images, labels) -> float:
    import numpy as np

    from dermflow.metrics import weighted_f1

    probs = model.predict(np.asarray(images, dtype=np.float32), batch_size=64, verbose=0)
    return weighted_f1(labels, np.asarray(probs).argmax(axis=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--atlas", type=Path, default=ATLAS_DIR)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--strip", type=float, default=WATERMARK_STRIP, help="bottom strip / corner size, share of the side")
    parser.add_argument("--cam-images", type=int, default=80)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import keras

    from dermflow.dataset import arrays as data_lib

    frame = manifest(args.atlas)
    class_names = sorted(frame.loc[frame["split"] == "train", "label"].unique())
    with tempfile.TemporaryDirectory(prefix="dermflow-watermark-") as tmp:
        arrays = data_lib.prepare_split_arrays(frame, lambda md5: args.atlas / "images" / f"{md5}.jpg",
                                               args.image_size, Path(tmp), class_names)
        idx = arrays.indices("test")
        images, labels = arrays.images[idx], arrays.labels[idx]
        results = []
        for path in args.models:
            model = keras.saving.load_model(path)
            row = {"model": str(path), "weighted_f1": score(model, images, labels),
                   "bottom_masked": score(model, masked(images, args.strip, "bottom"), labels),
                   "corners_masked": score(model, masked(images, args.strip, "corners"), labels),
                   "grad_cam": strip_mass(model, images, args.strip, args.cam_images)}
            results.append(row)
            print(f"{path.name}: weighted F1 {row['weighted_f1']:.4f}, bottom strip masked "
                  f"{row['bottom_masked']:.4f}, corners masked {row['corners_masked']:.4f}; Grad-CAM share in "
                  f"the bottom {args.strip:.0%}: {row['grad_cam']['strip_share']:.3f} "
                  f"({row['grad_cam']['ratio_to_area']:.2f}x its area)", flush=True)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
