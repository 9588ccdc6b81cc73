"""The fetch's task runner: `auto` takes Prefect's process pool only where it pays."""

import pytest
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

import flows.fetch as fetch_flow
from dermflow.ingestion import parallelism
from dermflow.ingestion.parallelism import break_even_rows, pool_pays

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("cores", "rows", "shards", "expected"), [
    (2, 16_577, 65, ThreadPoolTaskRunner),   # 2 cores: the pool is no faster per image than threads
    (4, 16_577, 65, ProcessPoolTaskRunner),  # the whole dataset on 4 cores: processes
    (4, 1_000, 4, ThreadPoolTaskRunner),     # a small fetch on 4 cores: the pool's start is not won back
    (16, 2_076, 9, ProcessPoolTaskRunner),   # the same on 16 cores: 9 workers win it back
    (16, 16_577, 1, ThreadPoolTaskRunner),   # one shard keeps one worker busy: no gain
    (2, None, None, ThreadPoolTaskRunner),   # a refetch: failed rows, mostly waiting, not CPU
    (1, 16_577, 65, ThreadPoolTaskRunner),   # one core: threads
])
def test_auto_takes_processes_only_where_they_pay(monkeypatch, cores, rows, shards, expected):
    monkeypatch.setattr(fetch_flow, "usable_cores", lambda: cores)
    runner, parallel = fetch_flow.fetch_runner("auto", None, shards=shards, rows=rows)
    assert isinstance(runner, expected)
    assert parallel == (cores if expected is ProcessPoolTaskRunner else fetch_flow.SHARD_PARALLELISM)


def test_an_explicit_runner_is_kept_whatever_the_rows(monkeypatch):
    monkeypatch.setattr(fetch_flow, "usable_cores", lambda: 2)
    assert isinstance(fetch_flow.fetch_runner("processes", None, shards=1, rows=10)[0], ProcessPoolTaskRunner)
    assert isinstance(fetch_flow.fetch_runner("threads", None, shards=99, rows=99_999)[0], ThreadPoolTaskRunner)


@pytest.mark.parametrize("cores", [3, 4, 8, 64])
def test_the_pool_pays_from_the_break_even_on(cores):
    rows = break_even_rows(cores)
    shards = cores  # a shard per worker
    assert not pool_pays(rows - 1, shards, cores)
    assert pool_pays(rows, shards, cores)


def test_the_break_even_falls_as_cores_are_added():
    evens = [break_even_rows(cores) for cores in (3, 4, 8, 16)]
    assert evens == sorted(evens, reverse=True)
    assert break_even_rows(1) is None
    # measured on 2 cores (bench/README): the pool and threads fetch at the same rate per image,
    # so the pool's start is never won back there
    assert break_even_rows(2) is None
    assert not pool_pays(10**7, 2, 2)


def test_the_model_follows_its_constants():
    # a pool that started instantly would pay at once on 2 cores; one as slow as threads, never
    instant = parallelism.RunnerCosts(threads_images_per_s=90, pool_images_per_s_per_core=60, pool_start_s=0)
    assert pool_pays(10, 2, 2, instant)
    no_faster = parallelism.RunnerCosts(threads_images_per_s=90, pool_images_per_s_per_core=45, pool_start_s=8)
    assert not pool_pays(10**7, 2, 2, no_faster)
    assert break_even_rows(2, no_faster) is None


def test_an_import_takes_its_own_costs(monkeypatch):
    # on 2 cores threads import faster than the pool at every size measured; on 8 the pool wins
    monkeypatch.setattr(fetch_flow, "usable_cores", lambda: 2)
    assert isinstance(fetch_flow.fetch_runner("auto", None, shards=65, rows=16_577, importing=True)[0],
                      ThreadPoolTaskRunner)
    assert break_even_rows(2, parallelism.IMPORT_COSTS) is None
    monkeypatch.setattr(fetch_flow, "usable_cores", lambda: 8)
    assert isinstance(fetch_flow.fetch_runner("auto", None, shards=65, rows=16_577, importing=True)[0],
                      ProcessPoolTaskRunner)
    assert break_even_rows(8, parallelism.IMPORT_COSTS) < 16_577


@pytest.mark.parametrize(("total", "shards", "least", "share"), [
    (16, 4, 1, 4), (16, 3, 1, 6), (16, 1, 1, 16), (16, 64, 1, 1), (16, 16, 2, 2), (3, 2, 1, 2),
])
def test_a_shard_gets_its_share_rounded_up(total, shards, least, share):
    assert parallelism.shard_share(total, shards, least=least) == share


def test_a_shard_gets_at_least_two_store_threads_but_may_get_one_request():
    assert parallelism.shard_budgets(16, 16, 4) == (4, 4)
    assert parallelism.shard_budgets(16, 16, 16) == (1, 2)


def test_a_share_among_no_shards_is_refused():
    with pytest.raises(ValueError, match="shards_at_once"):
        parallelism.shard_share(16, 0)


def test_the_shards_at_once_share_the_hosts_requests_and_the_store_threads(monkeypatch):
    """The fetch subflow's wiring: each shard task gets its part of `host_concurrency` and of
    the store threads, the import shards too (their tasks replaced by recorders)."""
    from dermflow.ingestion.fetch import FetchOptions

    submitted = {"fetch": [], "import": []}

    class Recorder:
        def __init__(self, kind):
            self.kind = kind

        def submit(self, *args):
            submitted[self.kind].append(args)
            return args

    monkeypatch.setattr(fetch_flow, "fetch_shard", Recorder("fetch"))
    monkeypatch.setattr(fetch_flow, "import_shard", Recorder("import"))
    monkeypatch.setattr(fetch_flow, "plan_fetch", lambda *a, **k: [{"key": "s1", "rows": 3}, {"key": "s2", "rows": 2}])
    monkeypatch.setattr(fetch_flow, "plan_import", lambda *a, **k: {"shards": [{"key": "i1"}], "summary": {}})
    monkeypatch.setattr(fetch_flow, "get_run_logger", lambda: __import__("logging").getLogger("test"))
    monkeypatch.setattr(fetch_flow, "as_completed", lambda futures: [])
    monkeypatch.setattr(fetch_flow, "release_import_source", lambda images: None)
    monkeypatch.setattr(fetch_flow, "run_shards", lambda futures, total: [])
    monkeypatch.setattr(fetch_flow, "write_fetch_manifest", lambda *a: {"summary": {"failed": 0}})
    monkeypatch.setattr(fetch_flow, "report_failures", lambda summary, images: None)
    fetch_flow.fetch_images.fn("manifests/datasets/x.csv", "20990101-000000-share", host_concurrency=16,
                               host_rate_limit=8.0, shard_parallelism=4, images="/archive.zip")
    share = FetchOptions.store_workers // 4
    assert submitted["fetch"] == [("s1", 4, 2.0, share), ("s2", 4, 2.0, share)]
    assert submitted["import"] == [("i1", "/archive.zip", share)]
