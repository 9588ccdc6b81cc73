"""`dermflow mirror`: the offline route of the README (a local mirror of a folder of images)."""

from __future__ import annotations

import csv

import httpx
import pytest

from dermflow.ops.cli import main
from dermflow.ops.mirror import rewrite_csv_host, serve_atlas
from tests.support.image_servers import synthetic_atlas

pytestmark = pytest.mark.unit


def test_the_mirror_serves_each_row_of_its_rewritten_csv(tmp_path):
    atlas = synthetic_atlas(tmp_path / "atlas", n_labels=2, per_label=3)
    with serve_atlas(atlas / "images", atlas / "rows.csv") as server:
        rows = list(csv.DictReader(open(rewrite_csv_host(atlas / "rows.csv", server.base_url, tmp_path / "out.csv"))))
        assert len(rows) == 6
        for row in rows:
            response = httpx.get(row["url"])
            assert response.status_code == 200
            assert response.content == (atlas / "images" / f"{row['md5hash']}.jpg").read_bytes()


def test_a_folder_without_images_is_a_clear_error(tmp_path, capsys):
    assert main(["mirror", str(tmp_path)]) == 1
    assert "images/<md5hash>.jpg" in capsys.readouterr().err
