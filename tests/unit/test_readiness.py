"""`dermflow up` waits for the Prefect API (issue 15): a call is retried while the server is not
answering yet, and ends in one clear line, not a traceback, when it never does."""

from __future__ import annotations

import httpx
import pytest

from dermflow.ops.readiness import ApiNotReady, call_when_ready

pytestmark = pytest.mark.unit

API = "http://127.0.0.1:4999/api"


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


class FakeClient:
    """A sync Prefect client whose first `failures` calls get `Connection refused`."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_work_pool(self, name):
        self.calls += 1
        if self.calls <= self.failures:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return {"name": name}


def _status_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", API)
    return httpx.HTTPStatusError(f"HTTP {code}", request=request, response=httpx.Response(code, request=request))


def test_a_call_is_retried_until_the_api_answers():
    client, clock = FakeClient(failures=3), FakeClock()
    result = call_when_ready(lambda: client.read_work_pool("dermflow"), API, timeout=60, sleep=clock.sleep, clock=clock)
    assert result == {"name": "dermflow"} and client.calls == 4
    assert clock.sleeps == [1.0, 2.0, 4.0]  # backing off


def test_server_errors_are_retried_too():
    answers = iter([_status_error(503), _status_error(502), "ok"])

    def call():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = FakeClock()
    assert call_when_ready(call, API, sleep=clock.sleep, clock=clock) == "ok"


def test_an_api_that_never_answers_ends_in_one_clear_line():
    client, clock = FakeClient(failures=10**6), FakeClock()
    with pytest.raises(ApiNotReady) as raised:
        call_when_ready(lambda: client.read_work_pool("dermflow"), API, timeout=30, sleep=clock.sleep, clock=clock)
    message = str(raised.value)
    assert "\n" not in message and API in message and "not answering after 30s" in message
    assert "ConnectError" in message and raised.value.__cause__ is None
    assert 30 <= clock.now <= 31 and client.calls > 3


def test_a_refused_auth_string_is_not_waited_for():
    clock = FakeClock()

    def call():
        raise _status_error(401)

    with pytest.raises(ApiNotReady, match="PREFECT_API_AUTH_STRING"):
        call_when_ready(call, API, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == []


def test_other_errors_are_not_swallowed():
    def call():
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        call_when_ready(call, API, sleep=lambda s: None)


def test_up_ends_with_one_line_when_the_api_never_answers(monkeypatch, tmp_path, capsys):
    """`dermflow up` against a server that answers /health but refuses the API calls."""
    import prefect.client.orchestration

    from dermflow.ops import cli, lifecycle, readiness

    client = FakeClient(failures=10**6)
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client=False: client)
    monkeypatch.setattr(readiness, "DEFAULT_TIMEOUT", 0.5)
    monkeypatch.setattr(lifecycle, "_settings_with_env_file", lambda: lifecycle.Settings(
        data_dir=tmp_path, PREFECT_API_URL=API))
    monkeypatch.setattr(lifecycle, "_start_storage", lambda settings: None)
    monkeypatch.setattr(lifecycle, "_prefect_server", lambda settings: None)
    monkeypatch.setattr(lifecycle, "set_prefect_profile", lambda url, auth: None)
    monkeypatch.setenv("PREFECT_API_URL", API)
    assert cli.main(["up", "--no-deploy", "--no-supervisor"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dermflow up: the Prefect API at") and "\n" not in err and "Traceback" not in err
    assert client.calls >= 1
