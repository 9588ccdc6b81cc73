"""Fixtures the stack tests share: a webhook receiver for alerts, and the images to serve.

Both are module-scoped, like the stacks they go with: each module gets its own receiver (so a
test reads only its own stack's alerts) and its own copy of the synthetic images."""

from __future__ import annotations

import pytest

from tests.conftest import ATLAS_DIR
from tests.integration.stack import WebhookReceiver
from tests.support.image_servers import synthetic_atlas


@pytest.fixture(scope="module")
def alerts():
    """A local webhook receiver; pass `alerts.url` as DERMFLOW_ALERT_WEBHOOK."""
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def image_source(tmp_path_factory):
    """(images dir, rows.csv) of real atlas20 images, or of a synthetic set without ../shared."""
    if (ATLAS_DIR / "rows.csv").exists():
        return ATLAS_DIR / "images", ATLAS_DIR / "rows.csv"
    root = synthetic_atlas(tmp_path_factory.mktemp("synthetic"), n_labels=4, per_label=24, size=96)
    return root / "images", root / "rows.csv"
