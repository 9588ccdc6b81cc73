"""`dermflow.load_model` loads a `model.keras` that uses dermflow's custom layers in a fresh
Python, where plain `keras.saving.load_model` would not know them (issue 15)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dermflow.settings import PROJECT_ROOT

pytestmark = pytest.mark.unit

SAVE = """
import keras, sys
from dermflow.modeling.models import ImagePreprocessing
inputs = keras.Input((8, 8, 3))
x = ImagePreprocessing("tf")(inputs)
outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
keras.Model(inputs, outputs).save(sys.argv[1])
"""
LOAD = """
import sys, numpy as np
import dermflow
model = dermflow.load_model(sys.argv[1])
print(model.predict(np.zeros((1, 8, 8, 3)), verbose=0).shape)
"""


def test_load_model_registers_the_custom_layers_first(tmp_path):
    path = str(tmp_path / "model.keras")
    env_run = dict(cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    subprocess.run([sys.executable, "-c", SAVE, path], check=True, **env_run)
    loaded = subprocess.run([sys.executable, "-c", LOAD, path], **env_run)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip().endswith("(1, 2)")
