"""derm/full on the real stack with `images=`: the dataset's images come from an archive (nested
folders, mixed-case extensions, macOS junk) while every image URL is dead (404). Real atlas20
images when `../shared` is there, synthetic ones otherwise."""

from __future__ import annotations

import tarfile

import pandas as pd
import pytest

from tests.integration.stack import start_stack
from tests.support.image_servers import serve_faults

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("stack"))
    yield stack
    stack.dermflow("down", check=False, timeout=120)


def test_full_run_from_an_archive_with_dead_urls(stack, image_source, tmp_path):
    images, rows_csv = image_source
    rows = pd.read_csv(rows_csv, dtype=str, keep_default_na=False)
    archive = tmp_path / "fitzpatrick17k-images.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        for index, path in enumerate(sorted(images.glob("*.jpg"))):
            extension = [".jpg", ".JPG", ".jpeg"][index % 3]
            handle.add(path, arcname=f"images/{index % 7}/{path.stem}{extension}")
            if index < 5:
                handle.add(path, arcname=f"__MACOSX/images/._{path.name}")
    with serve_faults({}) as dead:
        rows["url"] = [dead.url("404", md5) for md5 in rows["md5hash"]]
        csv_path = tmp_path / "rows.csv"
        rows.to_csv(csv_path, index=False)
        result = stack.prefect(
            "deployment", "run", "derm/full",
            "-p", f"csv={csv_path}", "-p", f"images={archive}", "-p", "limit_per_label=8", "-p", "image_size=64",
            "-p", "epochs=1", "-p", 'architectures=["baseline_cnn"]', "-p", "weights=none",
            "--watch", timeout=900, check=False,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert sum(dead.hits.values()) == 0  # every sampled row came from the archive
    store = stack.store()
    manifest = store.get_dataframe_csv("manifests/fetch.csv")
    assert set(manifest["status"]) == {"ok"} and set(manifest["source"]) == {"archive"}
    for md5 in manifest["md5hash"][:20]:
        assert store.get_bytes(f"images/{md5}") == (images / f"{md5}.jpg").read_bytes()
    runs = sorted({key.split("/")[1] for key in store.iter_keys("runs/") if key.endswith("/report.html")})
    assert len(runs) == 1
