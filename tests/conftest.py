"""Shared fixtures: a real SeaweedFS server for the session, a fresh bucket per test, and paths
to the shared real data (skipped cleanly where `../shared` is absent).

Test order: pytest-randomly (dev extra) shuffles the modules and the tests within each module
(it prints its seed; `--randomly-seed=N` replays an order, `-p no:randomly` turns it off). A module whose tests must run in the order they are written
(they share an expensive module fixture, such as a running stack, and build on each other's
results) says so in its docstring and marks itself `pytest.mark.in_order`: its tests keep their
written order wherever the shuffle puts the module. Every test still finds its own objects by
its own id, never by being the latest.
"""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
FULL_CSV = SHARED_DATA / "fitzpatrick17k.csv"
ATLAS_DIR = SHARED_DATA / "atlas20"

_COLLECTED_AT = pytest.StashKey[int]()
_collected = iter(range(10**9))


def pytest_itemcollected(item):
    """Remember the written order (collection order), before any plugin reorders."""
    item.stash[_COLLECTED_AT] = next(_collected)


def pytest_collection_modifyitems(config, items):
    """Put the tests of each `in_order` module back in their written order, in the slots the
    shuffle gave that module (pytest-randomly reorders in a wrapper, before this runs)."""
    slots: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        if item.get_closest_marker("in_order"):
            slots.setdefault(str(item.path), []).append(index)
    for indices in slots.values():
        written = sorted((items[index] for index in indices), key=lambda item: item.stash[_COLLECTED_AT])
        for index, item in zip(indices, written):
            items[index] = item


# Tests never read the developer's `.env` nor talk to the developer's stack.
os.environ["DERMFLOW_ENV_FILE"] = str(PROJECT_ROOT / "tests" / ".env.does-not-exist")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def full_csv() -> Path:
    if not FULL_CSV.exists():
        pytest.skip(f"{FULL_CSV} is absent (../shared not laid beside the project)")
    return FULL_CSV


@pytest.fixture(scope="session")
def atlas_dir() -> Path:
    if not (ATLAS_DIR / "rows.csv").exists():
        pytest.skip(f"{ATLAS_DIR} is absent (../shared not laid beside the project)")
    return ATLAS_DIR


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real SeaweedFS S3 server on free ports, shared by the session."""
    from dermflow.ops.stack import SeaweedServer, free_port_block

    server = SeaweedServer(
        data_dir=tmp_path_factory.mktemp("seaweed"),
        s3_port=free_port_block(4),
        access_key="test-" + secrets.token_hex(4),
        secret_key=secrets.token_hex(16),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """Environment (and so Settings) pointing at the test SeaweedFS with a fresh bucket."""
    bucket = "t-" + uuid.uuid4().hex[:12]
    seaweed.client().create_bucket(Bucket=bucket)
    values = {
        "AWS_ENDPOINT_URL": seaweed.endpoint_url,
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "DERMFLOW_BUCKET": bucket,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    from dermflow.settings import get_settings
    from tasks.common import object_store

    # Both caches: a task's object store built for an earlier test's bucket must not be reused.
    get_settings.cache_clear()
    object_store.cache_clear()
    yield values
    get_settings.cache_clear()
    object_store.cache_clear()


@pytest.fixture
def store(s3_env):
    """An ObjectStore on a fresh bucket of the test SeaweedFS."""
    from dermflow.settings import load_settings
    from dermflow.storage import ObjectStore

    return ObjectStore.from_settings(load_settings())


@pytest.fixture
def bucket(monkeypatch):
    """Every task's object store is one in-memory bucket (stack-free tests of tasks and flows)."""
    import tasks.common
    from dermflow.storage import ObjectStore
    from tests.support.memory_s3 import memory_store

    store = memory_store()
    monkeypatch.setattr(ObjectStore, "from_settings", classmethod(lambda cls, *args, **kwargs: store))
    tasks.common.object_store.cache_clear()
    yield store
    tasks.common.object_store.cache_clear()


@pytest.fixture(scope="module")
def harness():
    """A temporary Prefect server for whole flow runs in process (no workers, no stack)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
