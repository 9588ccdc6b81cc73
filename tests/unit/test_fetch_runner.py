"""The fetch's task runner: `auto` takes Prefect's process pool only where it pays."""

import pytest
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

import flows.fetch as fetch_flow

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("cores", "shards", "expected"), [
    (2, 5, ProcessPoolTaskRunner),   # several cores, several shards: processes
    (2, None, ProcessPoolTaskRunner),  # a refetch does not know its shards yet
    (2, 1, ThreadPoolTaskRunner),    # one shard would not win back the pool's start
    (1, 5, ThreadPoolTaskRunner),    # one core: threads
])
def test_auto_takes_processes_only_with_several_cores_and_shards(monkeypatch, cores, shards, expected):
    monkeypatch.setattr(fetch_flow, "usable_cores", lambda: cores)
    runner, parallel = fetch_flow.fetch_runner("auto", None, shards=shards)
    assert isinstance(runner, expected)
    assert parallel == (cores if expected is ProcessPoolTaskRunner else fetch_flow.SHARD_PARALLELISM)


def test_an_explicit_runner_is_kept_whatever_the_shards(monkeypatch):
    monkeypatch.setattr(fetch_flow, "usable_cores", lambda: 2)
    assert isinstance(fetch_flow.fetch_runner("processes", None, shards=1)[0], ProcessPoolTaskRunner)
    assert isinstance(fetch_flow.fetch_runner("threads", None, shards=9)[0], ThreadPoolTaskRunner)
