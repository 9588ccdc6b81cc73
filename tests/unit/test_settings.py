"""Invalid settings are one clear error that names the setting, for the CLI and the tasks."""

from __future__ import annotations

import pytest

from dermflow.errors import DermflowError, is_transient
from dermflow.ops.cli import main
from dermflow.settings import SettingsError, load_settings

pytestmark = pytest.mark.unit


def test_an_invalid_setting_is_a_permanent_error_naming_it(monkeypatch):
    monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", "*")
    with pytest.raises(SettingsError, match="allowed_hosts") as caught:
        load_settings()
    assert isinstance(caught.value, DermflowError) and not is_transient(caught.value)


def test_the_cli_prints_it_as_one_line(monkeypatch, capsys):
    from dermflow.settings import get_settings

    monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", "127.0.0.l")
    get_settings.cache_clear()
    try:
        assert main(["report", "20260101-000000-some-run"]) == 1
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "DERMFLOW_ALLOWED_HOSTS" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
