"""Prediction and evaluation with a small saved model in the bucket's run layout.

The stand-in model classifies an image by its dominant colour (red -> acne, green -> eczema,
blue -> psoriasis), so which predictions are right is known from how the images are made.
"""

import functools
import hashlib
import http.server
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from dermflow.evaluation.predict import (
    EvaluationError,
    ImageDecodeError,
    evaluate_dataset,
    evaluate_split,
    explain_image,
    load_image_array,
    load_model_bundle,
    predict_images,
)

pytestmark = pytest.mark.integration

CLASSES = ["acne", "eczema", "psoriasis"]  # red, green, blue
SIZE = 16
RUN_ID = "20261126-101500-calm-fox"
CSV_COLUMNS = ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
               "three_partition_label", "qc", "url", "url_alphanum"]


def colour_model():
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    conv = keras.layers.Conv2D(3, 1, name="features")
    x = keras.layers.GlobalAveragePooling2D()(conv(x))
    dense = keras.layers.Dense(3, activation="softmax")
    model = keras.Model(inputs, dense(x))
    conv.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3), np.zeros(3, np.float32)])
    dense.set_weights([np.eye(3, dtype=np.float32) * 8.0, np.zeros(3, np.float32)])
    return model


@pytest.fixture
def saved_model(store, tmp_path):
    model = colour_model()
    path = tmp_path / "model.keras"
    model.save(path)
    base = f"runs/{RUN_ID}/models/cnn/"
    store.put_file(base + "model.keras", path)
    store.put_json(base + "params.json", {"class_names": CLASSES, "image_size": SIZE, "architecture": "cnn"})
    store.put_json(base + "metrics.json", {"test": {"weighted_f1": 0.5}, "verified_test": None})
    return store


def colour_image(channel: int, seed: int, shape=(40, 30)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(*shape, 3)).astype(np.uint8)
    image[..., channel] = rng.integers(180, 255, size=shape)
    return image


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def labelled_set(tmp_path):
    """12 readable images (3 deliberately mislabelled), 2 rows without an image, 1 unknown
    label, 1 unreadable file. Returns (csv, images_dir, usable rows as (path, label, true colour))."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rows, usable = [], []
    extensions = [("JPEG", ".jpg"), ("PNG", ".png"), ("JPEG", ".jpeg"), ("PNG", "")]
    for i in range(12):
        colour = i % 3
        fmt, ext = extensions[i % 4]
        data = encode(colour_image(colour, seed=i), fmt)
        md5 = hashlib.md5(data).hexdigest()
        (images_dir / f"{md5}{ext}").write_bytes(data)
        label = CLASSES[(colour + 1) % 3] if i in (1, 5, 10) else CLASSES[colour]
        rows.append({"md5hash": md5, "label": label, "fitzpatrick_scale": str([1, 3, 5, -1][i % 4])})
        usable.append((images_dir / f"{md5}{ext}", label, CLASSES[colour]))
    for i in range(2):
        rows.append({"md5hash": hashlib.md5(f"missing{i}".encode()).hexdigest(), "label": "acne",
                     "fitzpatrick_scale": "2"})
    known_image = encode(colour_image(0, seed=99), "PNG")
    md5 = hashlib.md5(known_image).hexdigest()
    (images_dir / f"{md5}.png").write_bytes(known_image)
    rows.append({"md5hash": md5, "label": "vitiligo", "fitzpatrick_scale": "4"})
    broken = b"\xff\xd8\xff not really a jpeg"
    md5 = hashlib.md5(broken).hexdigest()
    (images_dir / f"{md5}.jpg").write_bytes(broken)
    rows.append({"md5hash": md5, "label": "eczema", "fitzpatrick_scale": "6"})

    import pandas as pd

    frame = pd.DataFrame(rows).reindex(columns=CSV_COLUMNS, fill_value="")
    csv_path = tmp_path / "rows.csv"
    frame.to_csv(csv_path, index=False)
    return csv_path, images_dir, usable


def test_model_is_downloaded_once_and_found_by_flow_run_name(saved_model, tmp_path, monkeypatch):
    calls = []
    original = type(saved_model).download_file

    def counting(self, key, path):
        calls.append(key)
        return original(self, key, path)

    monkeypatch.setattr(type(saved_model), "download_file", counting)
    bundle = load_model_bundle(saved_model, "calm-fox", None, cache_dir=tmp_path / "cache")
    assert (bundle.run_id, bundle.arch, bundle.class_names, bundle.image_size) == (RUN_ID, "cnn", CLASSES, SIZE)
    assert bundle.model_path == tmp_path / "cache" / RUN_ID / "cnn" / "model.keras"
    load_model_bundle(saved_model, RUN_ID, "cnn", cache_dir=tmp_path / "cache")
    assert len(calls) == 1


def test_evaluate_agrees_with_predict_and_counts_what_it_skips(saved_model, labelled_set, tmp_path):
    csv_path, images_dir, usable = labelled_set
    bundle = load_model_bundle(saved_model, RUN_ID, cache_dir=tmp_path / "cache")
    progress = []
    report = evaluate_dataset(bundle, csv_path, images_dir, batch_size=5,
                              progress=lambda done, total: progress.append((done, total)))

    predictions = predict_images(bundle, [str(path) for path, _, _ in usable], top_k=3)
    assert all(p["error"] is None and len(p["top"]) == 3 for p in predictions)
    # the colour model is right about every image's colour
    assert [p["top"][0]["label"] for p in predictions] == [colour for _, _, colour in usable]
    hits = [p["top"][0]["label"] == label for p, (_, label, _) in zip(predictions, usable)]
    assert report["accuracy"] == pytest.approx(np.mean(hits))
    assert report["accuracy"] < 1.0  # the mislabelled rows count as misses

    for key in ("accuracy", "weighted_f1", "macro_f1", "top3_accuracy", "top5_accuracy", "per_range",
                "per_class", "n", "rows", "evaluated", "skipped", "skipped_examples", "unknown_labels",
                "model", "tta"):
        assert key in report, key
    assert report["rows"] == 16 and report["evaluated"] == report["n"] == 12
    assert report["skipped"] == {"missing_image": 2, "unknown_label": 1, "unreadable_image": 1}
    assert report["unknown_labels"] == {"vitiligo": 1}
    assert set(report["per_range"]) == {"I-II", "III-IV", "V-VI", "unknown"}
    assert sum(r["n"] for r in report["per_range"].values()) == 12
    assert report["top3_accuracy"] == 1.0
    assert report["model"]["run_id"] == RUN_ID
    assert progress[-1] == (13, 13) and len(progress) == 3
    json.dumps(report, allow_nan=False)

    flipped = evaluate_dataset(bundle, csv_path, images_dir, tta=True)
    assert flipped["tta"] is True and flipped["accuracy"] == pytest.approx(report["accuracy"])


def test_evaluate_explains_unusable_input(saved_model, labelled_set, tmp_path):
    csv_path, images_dir, _ = labelled_set
    bundle = load_model_bundle(saved_model, RUN_ID, cache_dir=tmp_path / "cache")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("md5hash,diagnosis\nabc,acne\n")
    with pytest.raises(EvaluationError, match="label"):
        evaluate_dataset(bundle, bad_csv, images_dir)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(EvaluationError, match="16 rows.*15 without an image.*1 with a label"):
        evaluate_dataset(bundle, csv_path, empty_dir)


def test_evaluate_split_from_the_bucket_matches_evaluate_dataset(saved_model, labelled_set, tmp_path):
    import pandas as pd

    csv_path, images_dir, usable = labelled_set
    bundle = load_model_bundle(saved_model, RUN_ID, cache_dir=tmp_path / "cache")
    rows = []
    for path, label, _ in usable:
        md5 = path.name.split(".")[0]
        saved_model.put_bytes(f"images/{md5}", path.read_bytes())
        rows.append({"md5hash": md5, "label": label, "fitzpatrick_scale": "3", "fitzpatrick_range": "III-IV",
                     "qc": "", "split": "test", "dup_group": "0", "key": f"images/{md5}"})
    rows.append({**rows[0], "split": "train"})
    saved_model.put_dataframe_csv("manifests/split-abc.csv", pd.DataFrame(rows))
    from_bucket = evaluate_split(bundle, saved_model, "manifests/split-abc.csv")
    from_files = evaluate_dataset(bundle, csv_path, images_dir)
    assert from_bucket["n"] == 12
    assert from_bucket["weighted_f1"] == pytest.approx(from_files["weighted_f1"])


def test_predict_urls_and_report_bad_sources(saved_model, labelled_set, tmp_path, monkeypatch):
    from dermflow.settings import get_settings

    monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", "127.0.0.1")  # the URL guard refuses loopback otherwise
    get_settings.cache_clear()
    _, images_dir, usable = labelled_set
    bundle = load_model_bundle(saved_model, RUN_ID, cache_dir=tmp_path / "cache")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        path = usable[0][0]
        results = predict_images(
            bundle, [f"{base}/{path.name}", str(path), f"{base}/nope.jpg", str(tmp_path / "absent.png")], top_k=2
        )
    finally:
        server.shutdown()
        server.server_close()
    by_url, local, missing_url, missing_file = results
    assert by_url["error"] is None and by_url["top"] == local["top"]
    assert by_url["top"][0]["label"] == usable[0][2]
    assert sum(item["probability"] for item in by_url["top"]) <= 1.0 + 1e-6
    assert "404" in missing_url["error"] and missing_url["top"] == []
    assert "no such image file" in missing_file["error"]


def test_explain_image_writes_a_saliency_png(saved_model, labelled_set, tmp_path):
    _, _, usable = labelled_set
    bundle = load_model_bundle(saved_model, RUN_ID, cache_dir=tmp_path / "cache")
    path, _, colour = usable[2]
    explained = explain_image(bundle, str(path), tmp_path / "out" / "cam.png")
    assert explained["label"] == colour
    with Image.open(explained["path"]) as png:
        assert png.format == "PNG" and png.size == (SIZE, SIZE)


def test_load_image_array_crops_the_centre_square_and_resizes():
    image = np.zeros((10, 30, 3), dtype=np.uint8)
    image[:, :10] = (255, 0, 0)
    image[:, 10:20] = (0, 255, 0)
    image[:, 20:] = (0, 0, 255)
    array = load_image_array(encode(image, "PNG"), 8)
    assert array.shape == (8, 8, 3) and array.dtype == np.uint8
    assert (array[:, 2:6] == (0, 255, 0)).all()  # only the centre square remains

    rgba = np.zeros((6, 6, 4), dtype=np.uint8)  # fully transparent -> white background
    array = load_image_array(encode(rgba, "PNG"), 4)
    assert (array == 255).all()

    grey = load_image_array(encode(np.full((5, 5), 100, dtype=np.uint8), "PNG"), 3)
    assert grey.shape == (3, 3, 3) and (grey == 100).all()

    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        load_image_array(b"<html>not an image</html>", 8)


def put_test_split(store, usable, key: str = "manifests/split-new.csv") -> str:
    """A split manifest whose test rows are the labelled set's usable images."""
    import pandas as pd

    rows = []
    for path, label, _ in usable:
        md5 = path.name.split(".")[0]
        store.put_bytes(f"images/{md5}", path.read_bytes())
        rows.append({"md5hash": md5, "label": label, "fitzpatrick_scale": "3", "fitzpatrick_range": "III-IV",
                     "qc": "", "split": "test", "dup_group": "0", "key": f"images/{md5}"})
    store.put_dataframe_csv(key, pd.DataFrame(rows))
    return key


def test_the_derm_rescore_flow_scores_a_model_on_another_split_and_stores_it(saved_model, labelled_set,
                                                                              tmp_path, harness):
    """The flow a trainer runs for a promotion's re-scoring, with a real model and bucket."""
    from dermflow.layout import model_score_key
    from flows.rescore import derm_rescore

    split_key = put_test_split(saved_model, labelled_set[2])
    bundle = load_model_bundle(saved_model, RUN_ID, cache_dir=tmp_path / "cache")
    expected = evaluate_split(bundle, saved_model, split_key)["weighted_f1"]
    score = derm_rescore(run_id=RUN_ID, architecture="cnn", split_key=split_key, split_hash="split-new")
    assert score == pytest.approx(expected)
    record = saved_model.get_json(model_score_key(RUN_ID, "cnn", "split-new"))
    assert record["score"] == pytest.approx(expected) and record["split_key"] == split_key


def test_challenger_on_a_new_split_is_compared_with_the_champion_rescored_there(saved_model, labelled_set, tmp_path):
    from dermflow.registry.entries import get_champion_history, register_model
    from dermflow.evaluation.promotion import evaluate_challenger

    put_test_split(saved_model, labelled_set[2])
    params = {"class_names": CLASSES, "image_size": SIZE, "architecture": "cnn"}

    def register(run_id, score, split_hash):
        return register_model(saved_model, run_id, "cnn", metrics={"test": {"weighted_f1": score}},
                              params=params, data_manifest_hash="m", split_hash=split_hash, label_set=CLASSES)

    register(RUN_ID, 0.95, "split-old")
    first = evaluate_challenger(saved_model, challenger_run=RUN_ID, challenger_arch="cnn")
    assert first["promoted"] and first["champion_run"] is None

    bundle = load_model_bundle(saved_model, RUN_ID, cache_dir=tmp_path / "cache")
    true_score = evaluate_split(bundle, saved_model, "manifests/split-new.csv")["weighted_f1"]
    assert true_score < 0.95  # its registered score was on another split

    register("20261127-090000-weak-owl", true_score - 0.05, "split-new")
    weak = evaluate_challenger(saved_model, challenger_run="20261127-090000-weak-owl", challenger_arch="cnn",
                               split_key="manifests/split-new.csv", split_hash="split-new",
                               cache_dir=tmp_path / "cache")
    assert not weak["promoted"] and weak["champion_rescored"]
    assert weak["champion_score"] == pytest.approx(true_score)

    register("20261127-100000-keen-elk", true_score + 0.05, "split-new")
    strong = evaluate_challenger(saved_model, challenger_run="20261127-100000-keen-elk", challenger_arch="cnn",
                                 split_key="manifests/split-new.csv", split_hash="split-new",
                                 cache_dir=tmp_path / "cache")
    assert strong["promoted"] and "re-scored" in strong["reason"]
    assert strong["champion"]["run_id"] == "20261127-100000-keen-elk"
    assert strong["champion"]["split_hash"] == "split-new"
    history = get_champion_history(saved_model, strong["champion"]["label_set_id"])
    assert [h["run_id"] for h in history] == [RUN_ID, "20261127-100000-keen-elk"]


def test_evaluate_on_real_atlas_rows(atlas_dir, tmp_path):
    """The real schema and files: md5-named JPEGs, real labels, real skin types."""
    import pandas as pd

    from dermflow.evaluation.predict import bundle_from_model

    rows = pd.read_csv(atlas_dir / "rows.csv", dtype=str, keep_default_na=False)
    subset = rows.groupby("label").head(3)
    labels = sorted(subset["label"].unique())
    subset = pd.concat([subset, pd.DataFrame([{**subset.iloc[0].to_dict(), "md5hash": "0" * 32}])])
    csv_path = tmp_path / "rows.csv"
    subset.to_csv(csv_path, index=False)

    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(len(labels), activation="softmax")(x))
    bundle = bundle_from_model(model, {"class_names": labels, "image_size": SIZE})

    report = evaluate_dataset(bundle, csv_path, atlas_dir / "images")
    assert report["rows"] == len(subset) and report["evaluated"] == len(subset) - 1
    assert report["skipped"]["missing_image"] == 1 and report["skipped"]["unreadable_image"] == 0
    assert sum(r["n"] for r in report["per_range"].values()) == report["evaluated"]
    assert 0.0 <= report["accuracy"] <= report["top3_accuracy"] <= report["top5_accuracy"] <= 1.0
