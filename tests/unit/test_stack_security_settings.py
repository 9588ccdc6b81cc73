"""What `dermflow up` gives the Prefect server and its clients (issue 14, findings 2 and 16a),
checked without starting anything; tests/integration/test_stack_hardening.py checks a real server."""

import pytest

from dermflow.ops.envfile import default_env_values, ensure_env_file
from dermflow.ops.stack import PrefectServer
from dermflow.settings import Settings

pytestmark = pytest.mark.unit


def test_make_up_generates_a_random_auth_string_into_env(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    first, second = default_env_values()["PREFECT_API_AUTH_STRING"], default_env_values()["PREFECT_API_AUTH_STRING"]
    user, password = first.split(":", 1)
    assert user and len(password) >= 24 and first != second
    env = tmp_path / ".env"
    assert "PREFECT_API_AUTH_STRING" in ensure_env_file(env, default_env_values())
    assert env.stat().st_mode & 0o077 == 0
    settings = Settings(_env_file=env)
    assert settings.prefect_api_auth_string.get_secret_value().startswith("dermflow:")


def test_the_server_gets_auth_csrf_own_origin_cors_and_disk_leases(tmp_path):
    env = PrefectServer(tmp_path, 4321, auth_string="dermflow:pw").security_env()
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == "dermflow:pw"
    assert env["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    assert set(env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"].split(",")) == {
        "http://127.0.0.1:4321", "http://localhost:4321"}
    assert env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == "prefect.server.concurrency.lease_storage.filesystem"


def test_the_lease_storage_module_ships_with_prefect():
    import importlib

    module = importlib.import_module("prefect.server.concurrency.lease_storage.filesystem")
    assert hasattr(module, "ConcurrencyLeaseStorage")


def test_secrets_are_secret_settings(monkeypatch):
    monkeypatch.setenv("DERMFLOW_ALERT_WEBHOOK", "https://hooks.example/T0/secret-token")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "dermflow:pw")
    settings = Settings(_env_file=None)
    assert "secret-token" not in repr(settings) and "pw" not in str(settings.prefect_api_auth_string)
    assert settings.alert_webhook.get_secret_value().endswith("secret-token")


def test_gpu_leases_are_at_least_prefects_minimum(monkeypatch):
    assert 60 <= Settings(_env_file=None).gpu_lease_seconds <= 300
    monkeypatch.setenv("DERMFLOW_GPU_LEASE_SECONDS", "10")
    with pytest.raises(ValueError, match="60"):
        Settings(_env_file=None)
