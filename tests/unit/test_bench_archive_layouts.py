"""The archive layouts benchmark builds what it claims: each layout's archive, read by dermflow's
own archive reader, holds every row it says it holds (byte-identical), and the junk layout's
extras are counted as unused by kind."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.bench_archive_layouts import LAYOUTS, build_archive
from dermflow.ingestion.archive import MemberDamaged, match_members, open_local
from tests.support.image_servers import synthetic_atlas

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = synthetic_atlas(tmp_path_factory.mktemp("atlas"), n_labels=2, per_label=8, size=32)
    return root / "images", pd.read_csv(root / "rows.csv", dtype=str, keep_default_na=False).to_dict("records")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_holds_its_rows_byte_identical(layout, atlas, tmp_path):
    images, rows = atlas
    path, held = build_archive(layout, images, rows, tmp_path, missing=2)
    wanted = {row["md5hash"] for row in rows}
    with open_local(path) as source:
        match = match_members(source.names(), wanted)
        bodies = dict(source.read_members(set(match.matched.values())))
    left_out = 2 if layout == "junk-zip" else 0
    assert held["rows_left_out"] == left_out
    assert len(match.matched) == len(rows) - left_out
    for md5, name in match.matched.items():
        original = (images / f"{md5}.jpg").read_bytes()
        if md5 in held["damaged"]:
            assert bodies[name] != original and original.startswith(bodies[name])  # cut short
        else:
            assert not isinstance(bodies[name], MemberDamaged) and bodies[name] == original


def test_the_junk_layout_carries_what_hand_made_archives_do(atlas, tmp_path):
    images, rows = atlas
    path, held = build_archive("junk-zip", images, rows, tmp_path, missing=1)
    with open_local(path) as source:
        match = match_members(source.names(), {row["md5hash"] for row in rows})
    counts = match.unused.counts
    # a __MACOSX fork per image, two .DS_Store, README, LICENSE, Thumbs.db, a CSV of notes
    assert counts["junk"] == len(rows) + 6
    assert counts["not_md5"] == 2 and counts["not_in_csv"] == 3
    assert len(held["damaged"]) == 1 and held["members_junk"] == sum(counts.values())


def test_the_mixed_case_layout_mixes_extension_and_stem_case(atlas, tmp_path):
    images, rows = atlas
    path, _ = build_archive("mixed-case-zip", images, rows, tmp_path, missing=0)
    with open_local(path) as source:
        names = source.names()
    assert {name.rsplit(".", 1)[1] for name in names} == {"jpg", "JPG", "jpeg", "JPEG", "Jpg"}
    assert any(name.split(".")[0].isupper() for name in names) and any(name.split(".")[0].islower() for name in names)
