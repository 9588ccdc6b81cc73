"""`make up` writes every settings key the `.env` lacks (issue 15): stack keys with values,
the other settings with their defaults, empty defaults commented out; never twice, never over
a key the user set."""

from __future__ import annotations

import subprocess

import pytest

from dermflow.ops.envfile import commented_keys, default_env_values, ensure_env_file, read_env_file
from dermflow.settings import Settings

pytestmark = pytest.mark.unit


def _env_names() -> set[str]:
    from pydantic import AliasChoices

    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias.choices[0] if isinstance(alias, AliasChoices) else f"DERMFLOW_{name.upper()}")
    return names


@pytest.fixture
def clean_environment(monkeypatch):
    for name in _env_names():
        monkeypatch.delenv(name, raising=False)


def test_every_settings_key_is_written_once_empty_defaults_commented(tmp_path, clean_environment):
    env = tmp_path / ".env"
    env.write_text("DERMFLOW_KEEP_RUNS=5\n# DERMFLOW_GPU_SLOTS=2\n")
    added = ensure_env_file(env, default_env_values(9333, 5200))
    assert set(added) == _env_names() - {"DERMFLOW_KEEP_RUNS", "DERMFLOW_GPU_SLOTS"}
    values, commented = read_env_file(env), commented_keys(env)
    assert set(values) | commented == _env_names()
    assert values["DERMFLOW_KEEP_RUNS"] == "5" and values["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9333"
    assert values["DERMFLOW_S3_PORT"] == "9333" and values["DERMFLOW_PREFECT_PORT"] == "5200"
    assert {"DERMFLOW_ALERT_WEBHOOK", "DERMFLOW_CACHE_DIR", "DERMFLOW_DATA_DIR"} <= commented
    assert "# DERMFLOW_ALERT_WEBHOOK=\n" in env.read_text()
    assert ensure_env_file(env, default_env_values(9333, 5200)) == []  # a second `make up` adds nothing
    settings = Settings(_env_file=env)
    defaults = Settings(_env_file=None)
    assert settings.keep_runs == 5 and settings.user_agent == defaults.user_agent
    assert settings.gpu_slots is None and settings.alert_webhook is None and settings.data_dir == defaults.data_dir


def test_the_written_file_can_be_sourced_by_a_shell(tmp_path, clean_environment):
    env = tmp_path / ".env"
    ensure_env_file(env, default_env_values())
    shown = subprocess.run(["bash", "-c", f"set -a; source {env}; printf %s \"$DERMFLOW_USER_AGENT\""],
                           capture_output=True, text=True, check=True).stdout
    assert shown == Settings(_env_file=None).user_agent
