"""derm/full end to end on the real stack: `dermflow up` (SeaweedFS, Prefect server, workers,
deployments), images served by a local HTTP server, `prefect deployment run derm/full --watch`,
then the bucket is checked for everything the run promises. Real atlas20 images when
`../shared` is there, synthetic ones otherwise.

The tests run in their written order (`pytest.mark.in_order`; pytest-randomly shuffles only
where the modules run): they share one stack and the `full_run` fixture, the retrain tests build
on the champion the full run made, and cancelling runs last because it leaves a cancelled run
behind. Each test still finds its own runs by the flow run name or id its deployment run
printed, never as the latest run in the bucket (other tests' runs, such as the `20990101-...`
trainings of the gpu-limit test, sort later)."""

from __future__ import annotations

import datetime
import json
import re

import pytest

from dermflow import layout
from tests.integration.stack import start_stack
from tests.support.image_servers import rewrite_csv_host, serve_atlas, synthetic_atlas

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.in_order]


def _own_run_id(store, result) -> str:
    """The run id of the `derm` run that `prefect deployment run` started: run ids end with the
    flow run's name, which the command printed."""
    from dermflow.registry.runs import resolve_run_id

    name = re.search(r"Created flow run '([^']+)'", result.stdout).group(1)
    return resolve_run_id(store, name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, alerts):
    stack = start_stack(tmp_path_factory.mktemp("stack"), gpu_slots=2,
                        extra_env={"DERMFLOW_ALERT_WEBHOOK": alerts.url})
    yield stack
    stack.dermflow("down", check=False, timeout=120)


@pytest.fixture(scope="module")
def full_run(stack, image_source, tmp_path_factory):
    images, rows = image_source
    with serve_atlas(images, rows) as server:
        csv_path = rewrite_csv_host(rows, server.base_url, tmp_path_factory.mktemp("csv") / "rows.csv",
                                    limit_per_label=8)
        result = stack.prefect(
            "deployment", "run", "derm/full",
            "-p", f"csv={csv_path}", "-p", "limit_per_label=8", "-p", "image_size=64", "-p", "epochs=1",
            "-p", 'architectures=["baseline_cnn"]', "--watch", timeout=900, check=False,
        )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    store = stack.store()
    return {"store": store, "run_id": _own_run_id(store, result), "csv": csv_path, "output": result.stdout}


def test_full_run_leaves_everything_in_the_bucket(full_run):
    import pandas as pd

    store, run_id = full_run["store"], full_run["run_id"]
    rows = pd.read_csv(full_run["csv"])
    images = store.list_keys("images/")
    assert len(images) == len(rows)
    manifest = store.get_dataframe_csv(layout.fetch_manifest_history_key(run_id))
    assert len(manifest) == len(rows) and set(manifest["status"]) == {"ok"}
    assert any(key.startswith("manifests/split-") and key.endswith(".csv") for key in store.iter_keys("manifests/"))
    for name in ("report.html", "metrics.json", "params.json", "models/baseline_cnn/model.keras",
                 "models/baseline_cnn/metrics.json", "models/baseline_cnn/predictions.npz"):
        assert store.exists(f"runs/{run_id}/{name}"), name
    metrics = store.get_json(f"runs/{run_id}/metrics.json")
    test = metrics["architectures"]["baseline_cnn"]["test"]
    for key in ("accuracy", "weighted_f1", "macro_f1", "top3_accuracy"):
        assert 0.0 <= test[key] <= 1.0
    assert metrics["duplicates"]["cross_split"] == 0
    html = store.get_bytes(f"runs/{run_id}/report.html").decode()
    assert "baseline_cnn" in html and "not for clinical use" in html.lower()
    from dermflow.config import RunConfig

    stored = store.get_json(f"runs/{run_id}/params.json")  # the resolved config, a model dump
    config = RunConfig.model_validate(stored["config"])
    assert config.training.image_size == 64 and config.training.architectures == ["baseline_cnn"]
    assert stored["run_id"] == run_id and stored["resolved"]["epochs"] == config.final_epochs()


def test_rerun_of_fetch_fetches_nothing(stack, full_run, image_source):
    images, rows = image_source
    with serve_atlas(images, rows) as server:
        csv_path = rewrite_csv_host(rows, server.base_url, full_run["csv"].with_name("again.csv"), limit_per_label=8)
        stack.prefect("deployment", "run", "derm/fetch", "-p", f"csv={csv_path}",
                      "-p", "limit_per_label=8", "--watch", timeout=600)
        assert sum(server.hits.values()) == 0  # everything was already stored: one listing, no GETs


def test_cli_report_and_status(stack, full_run):
    status = stack.dermflow("status", "--json")
    services = json.loads(status.stdout)["services"]
    assert all(service["healthy"] for service in services)
    report = stack.dermflow("report", full_run["run_id"], "--json")
    assert "baseline_cnn" in json.loads(report.stdout)["architectures"]
    listing = json.loads(stack.dermflow("runs", "--json", "--limit", "0").stdout)  # issue 15: lists the e2e run
    [row] = [run for run in listing["runs"] if run["run_id"] == full_run["run_id"]]
    assert listing["prefect_reachable"] and row["state"] == "Completed" and row["mode"] == "full"
    assert row["best_architecture"] == "baseline_cnn" and row["weighted_f1"] is not None
    by_name = stack.dermflow("report", row["flow_run_name"], "--json")  # the flow run's name, as predict takes
    assert "baseline_cnn" in json.loads(by_name.stdout)["architectures"]


def _flow_runs(stack, flow_name: str) -> list:
    """Flow runs of one flow, through the stack's Prefect API."""
    import asyncio

    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def read():
        async with stack.prefect_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))

    return asyncio.run(read())


def _champion(store) -> dict:
    from dermflow.registry.entries import list_champions

    champions = list_champions(store)
    assert len(champions) == 1
    return champions[0]


def test_retrain_on_unchanged_data_fetches_and_trains_nothing(stack, full_run, image_source):
    store = full_run["store"]
    champion_before = _champion(store)
    trainings_before = len(_flow_runs(stack, "derm-train"))
    images, rows = image_source
    with serve_atlas(images, rows) as server:
        csv_path = rewrite_csv_host(rows, server.base_url, full_run["csv"].with_name("retrain.csv"), limit_per_label=8)
        result = stack.prefect("deployment", "run", "derm/retrain", "-p", f"csv={csv_path}", "-p", "limit_per_label=8",
                               "-p", "image_size=64", "-p", "epochs=1", "-p", 'architectures=["baseline_cnn"]',
                               "--watch", timeout=900)
        assert sum(server.hits.values()) == 0
    assert len(_flow_runs(stack, "derm-train")) == trainings_before
    champion_after = _champion(store)
    assert (champion_after["run_id"], champion_after["arch"]) == (champion_before["run_id"], champion_before["arch"])
    decision = store.get_json(layout.run_metrics_key(_own_run_id(store, result)))["retrain_decision"]
    assert decision["promoted"] is False and decision["reason"]


def test_retrain_promotes_a_challenger_that_beats_the_champion(stack, full_run, image_source):
    store = full_run["store"]
    champion = _champion(store)
    # A champion that scores 0 on this split: any real challenger beats it. (The champion is
    # the last promotion record; the pointer is only a copy.)
    record_key = layout.promotion_record_key(champion["label_set_id"], champion["sequence"])
    store.put_json(record_key, {**store.get_json(record_key), "score": 0.0})
    images, rows = image_source
    with serve_atlas(images, rows) as server:
        csv_path = rewrite_csv_host(rows, server.base_url, full_run["csv"].with_name("retrain2.csv"), limit_per_label=8)
        result = stack.prefect("deployment", "run", "derm/retrain", "-p", f"csv={csv_path}", "-p", "limit_per_label=8",
                               "-p", "image_size=64", "-p", "epochs=2", "-p", 'architectures=["baseline_cnn"]',
                               "--watch", timeout=900)
    run_id = _own_run_id(store, result)
    new = _champion(store)
    assert new["run_id"] != champion["run_id"]
    assert new["run_id"] == run_id
    decision = store.get_json(layout.run_metrics_key(run_id))["retrain_decision"]
    assert decision["promoted"] is True and "beats" in decision["reason"]


def test_a_champion_from_another_split_is_rescored_on_a_trainer(stack, full_run, image_source):
    """Another seed splits the same rows differently, so the champion's score is not comparable:
    it is re-scored on the new test split by a `derm-rescore` flow run on the `gpu` queue (a
    subflow of the retrain), and the decision uses the score that run stored."""
    store = full_run["store"]
    champion = _champion(store)
    images, rows = image_source
    with serve_atlas(images, rows) as server:
        csv_path = rewrite_csv_host(rows, server.base_url, full_run["csv"].with_name("retrain3.csv"), limit_per_label=8)
        result = stack.prefect("deployment", "run", "derm/retrain", "-p", f"csv={csv_path}", "-p", "limit_per_label=8",
                               "-p", "image_size=64", "-p", "epochs=1", "-p", "seed=7",
                               "-p", 'architectures=["baseline_cnn"]', "--watch", timeout=900)
    decision = store.get_json(layout.run_metrics_key(_own_run_id(store, result)))["retrain_decision"]
    assert decision["champion_rescored"] is True and decision["champion_run"] == champion["run_id"]
    [rescore] = [run for run in _flow_runs(stack, "derm-rescore")
                 if run.name == f"rescore-{champion['run_id']}-{champion['arch']}"]
    assert rescore.state.is_completed() and rescore.work_queue_name == "gpu"
    assert rescore.parent_task_run_id is not None  # shown under the retrain's promotion task
    [score_key] = store.list_keys(layout.model_prefix(champion["run_id"], champion["arch"]) + "scores/")
    assert store.get_json(score_key)["score"] == pytest.approx(decision["champion_score"])
    assert decision["promoted"] == (decision["challenger_score"] > decision["champion_score"])


def _train_intervals(stack, run_ids: list[str]) -> list[tuple]:
    """(flow run start, training start, training end) of each training flow run: the training
    is the `train-architecture` task, the part that holds the `gpu` slot."""
    import asyncio

    from prefect.client.schemas.filters import FlowRunFilter, TaskRunFilter, TaskRunFilterName

    async def read():
        async with stack.prefect_client() as client:
            intervals = []
            for flow_run_id in run_ids:
                flow_run = await client.read_flow_run(flow_run_id)
                tasks = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}),
                    task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train-architecture")),
                )
                assert tasks and tasks[0].state.is_completed(), tasks
                intervals.append((flow_run.start_time, tasks[0].start_time, tasks[0].end_time))
            return intervals

    return asyncio.run(read())


def _set_gpu_limit(stack, slots: int) -> None:
    stack.prefect("gcl", "update", "gpu", "--limit", str(slots))


def _train_two_at_once(stack, split_key: str, run_id: str) -> list[tuple]:
    """Two architectures' `derm-train` runs, launched together; their intervals."""
    import asyncio

    from prefect.deployments import run_deployment

    async def launch():
        async with stack.prefect_client() as client:
            runs = await asyncio.gather(*(
                run_deployment("derm-train/default", client=client, timeout=600, poll_interval=2, as_subflow=False,
                               parameters={"architecture": arch, "split_key": split_key, "run_id": run_id,
                                           "image_size": 96, "epochs": 3, "weights": "none"})
                for arch in ("baseline_cnn", "vgg16")))
            return [run.id for run in runs], [run.state.name for run in runs]

    ids, states = asyncio.run(launch())
    assert states == ["Completed", "Completed"], states
    return _train_intervals(stack, ids)


PICKUP_MARGIN = datetime.timedelta(seconds=5)  # flow run start to its training start, unhindered


@pytest.mark.parametrize("slots", [1, 2])
def test_training_subflows_overlap_only_when_the_gpu_limit_allows(stack, full_run, slots):
    """Two architectures, each its own derm-train flow run in its own process (two training
    workers exist): with a `gpu` limit of 1 they run one after the other, with 2 at once.

    Only launches whose two flow runs were both running before either training ended can
    tell: a worker that picks the second run up after the first training ended (a slow
    process start on a busy box) proves nothing either way, so such a launch is made again."""
    store = full_run["store"]
    split_key = next(k for k in store.iter_keys("manifests/") if k.startswith("manifests/split-") and k.endswith(".csv"))
    _set_gpu_limit(stack, slots)
    try:
        for attempt in range(3):
            intervals = _train_two_at_once(stack, split_key, f"20990101-00000{attempt}-limit{slots}")
            # both flow runs up, with time to take a slot, before either training ended
            if max(flow_start for flow_start, _, _ in intervals) + PICKUP_MARGIN < min(end for _, _, end in intervals):
                break
        else:
            pytest.fail(f"in 3 launches the two training runs were never running at the same time: {intervals}")
        (_, a_start, a_end), (_, b_start, b_end) = intervals
        overlap = min(a_end, b_end) > max(a_start, b_start)
        assert overlap is (slots == 2), (slots, intervals)
    finally:
        _set_gpu_limit(stack, 2)


def _unreachable_csv(tmp_path):
    """Rows of images not in the bucket (a fresh synthetic set) whose host does not answer."""
    from dermflow.ops.stack import free_port_block

    root = synthetic_atlas(tmp_path / "unseen", n_labels=3, per_label=6, size=48, seed=1234)
    dead = f"http://127.0.0.1:{free_port_block(1)}"
    return rewrite_csv_host(root / "rows.csv", dead, tmp_path / "dead.csv")


def test_unreachable_image_hosts_stop_with_a_clear_message(stack, tmp_path):
    csv_path = _unreachable_csv(tmp_path)
    result = stack.prefect("deployment", "run", "derm/full", "-p", f"csv={csv_path}",
                           "-p", "image_size=32", "-p", "epochs=1", "-p", 'architectures=["baseline_cnn"]',
                           "--watch", timeout=900, check=False)
    assert result.returncode != 0
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)
    message = next(run.state.message for run in _flow_runs(stack, "derm") if str(run.id) == run_id) or ""
    assert "fetched 0 of" in message and "connect_error" in message and "too few to split" in message, message


def test_a_failed_retrain_posts_an_alert(stack, alerts, tmp_path):
    import time

    csv_path = _unreachable_csv(tmp_path)
    result = stack.prefect("deployment", "run", "derm/retrain", "-p", f"csv={csv_path}",
                           "--watch", timeout=900, check=False)
    assert result.returncode != 0
    deadline = time.monotonic() + 120
    while not alerts.received and time.monotonic() < deadline:
        time.sleep(2)
    assert alerts.received, "no alert was posted for the failed retrain"
    assert "derm/retrain Failed" in alerts.received[-1]["subject"]  # the subject names the state
    assert "Failed" in alerts.received[-1]["body"]


def _deployment(stack, name: str, action: str | None = None):
    """Read a deployment (after pausing or resuming it, as the UI's toggle does)."""
    import asyncio


    async def go():
        async with stack.prefect_client() as client:
            deployment = await client.read_deployment_by_name(name)
            if action == "pause":
                await client.pause_deployment(deployment.id)
            elif action == "resume":
                await client.resume_deployment(deployment.id)
            return await client.read_deployment_by_name(name)

    return asyncio.run(go())


def test_up_again_keeps_a_paused_retrain_paused(stack):
    assert _deployment(stack, "derm/retrain", "pause").paused is True
    stack.dermflow("up", timeout=600)
    assert _deployment(stack, "derm/retrain").paused is True
    assert _deployment(stack, "derm/retrain", "resume").paused is False
    stack.dermflow("up", timeout=600)
    assert _deployment(stack, "derm/retrain").paused is False


def test_refetch_retries_only_the_failed_rows(stack, tmp_path):
    """derm/fetch while the image host is down fails every row (connect_error); once the host
    is up, derm/refetch fetches exactly those rows and the manifest says ok for all."""
    from dermflow.ops.stack import free_port_block

    root = synthetic_atlas(tmp_path / "later", n_labels=2, per_label=5, size=48, seed=4321)
    port = free_port_block(1)
    csv_path = rewrite_csv_host(root / "rows.csv", f"http://127.0.0.1:{port}", tmp_path / "later.csv")
    fetched = stack.prefect("deployment", "run", "derm/fetch", "-p", f"csv={csv_path}", "--watch", timeout=600)
    store = stack.store()
    manifest = store.get_dataframe_csv(layout.fetch_manifest_history_key(_own_run_id(store, fetched)))
    assert set(manifest["status"]) == {"failed"} and set(manifest["reason"]) == {"connect_error"}
    with serve_atlas(root / "images", root / "rows.csv", port=port) as server:
        refetched = stack.prefect("deployment", "run", "derm/refetch", "--watch", timeout=600)
        assert sum(server.hits.values()) == len(manifest) == 10
    manifest = store.get_dataframe_csv(layout.fetch_manifest_history_key(_own_run_id(store, refetched)))
    assert len(manifest) == 10 and set(manifest["status"]) == {"ok"}
    assert all(store.exists(f"images/{md5}") for md5 in manifest["md5hash"])


def test_cli_predict_and_evaluate_agree_on_the_champion(stack, full_run, image_source, tmp_path):
    """`dermflow evaluate`'s accuracy equals the share of top-1 hits of `dermflow predict` on
    the same images; both print the not-for-clinical-use note or carry it in JSON."""
    import pandas as pd

    images, _ = image_source
    rows = pd.read_csv(full_run["csv"], dtype=str, keep_default_na=False).head(12)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    paths = [str(images / f"{md5}.jpg") for md5 in rows["md5hash"]]
    predicted = json.loads(stack.dermflow("predict", *paths, "--json").stdout)
    assert "clinical" in predicted["note"]
    hits = [p["top"][0]["label"] == label for p, label in zip(predicted["predictions"], rows["label"])]
    n_classes = predicted["model"]["n_classes"]
    assert all(len(p["top"]) == min(5, n_classes) for p in predicted["predictions"])
    evaluated = json.loads(stack.dermflow("evaluate", "--csv", str(tmp_path / "rows.csv"),
                                          "--images", str(images), "--json").stdout)
    for key in ("accuracy", "weighted_f1", "macro_f1", "top3_accuracy", "per_range"):
        assert key in evaluated
    assert evaluated["n"] == len(rows)
    assert evaluated["accuracy"] == pytest.approx(sum(hits) / len(hits))
    text = stack.dermflow("predict", paths[0], "--explain", str(tmp_path / "cam.png")).stdout
    assert "not for clinical use" in text.lower()
    from PIL import Image

    with Image.open(tmp_path / "cam.png") as cam:
        assert cam.size[0] > 0 and cam.size[1] > 0
    missing = stack.dermflow("predict", "--model", "no-such-run", paths[0], check=False)
    assert missing.returncode == 1 and "no-such-run" in missing.stderr


def test_distributed_tuning_runs_its_workers_as_deployment_runs(stack, full_run, image_source):
    """derm/full with tune_workers=2: a keras-tuner chief in the parent's search subflow and two
    `derm-tune/worker` flow runs (on the gpu queue, each holding a `gpu` slot) share two trials;
    the final training uses the best one."""
    images, rows = image_source
    before = {run.id for run in _flow_runs(stack, "derm-tune")}
    store = stack.store()
    trials_before = {key for key in store.iter_keys("tuning/") if key.endswith("/trial.json")}
    with serve_atlas(images, rows) as server:
        csv_path = rewrite_csv_host(rows, server.base_url, full_run["csv"].with_name("tune.csv"), limit_per_label=8)
        result = stack.prefect(
            "deployment", "run", "derm/full", "-p", f"csv={csv_path}", "-p", "limit_per_label=8",
            "-p", "image_size=64", "-p", "epochs=2", "-p", 'architectures=["baseline_cnn"]', "-p", "tune=true",
            "-p", "tune_workers=2", "-p", "max_trials=2", "-p", "seed=11", "--watch", timeout=900, check=False,
        )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    workers = [run for run in _flow_runs(stack, "derm-tune") if run.id not in before]
    assert len(workers) == 2, workers
    assert all(run.state.is_completed() and run.parent_task_run_id is not None for run in workers)
    assert {run.work_queue_name for run in workers} == {"gpu"}

    trials = [store.get_json(key) for key in store.iter_keys("tuning/")
              if key.endswith("/trial.json") and key not in trials_before]
    scored = [t for t in trials if t.get("status") == "COMPLETED" and t.get("score") is not None]
    assert len(scored) == 2, [t.get("status") for t in trials]
    best = max(scored, key=lambda t: t["score"])["hyperparameters"]["values"]
    # this run's own model (the latest run in the bucket may be another test's)
    params = store.get_json(layout.model_key(_own_run_id(store, result), "baseline_cnn", "params.json"))
    assert (params["optimizer"], params["learning_rate"], params["lr_schedule"]) == (
        best["optimizer"], best["learning_rate"], best["lr_schedule"]), (params, best)


def test_cancelling_the_parent_cancels_its_training_subflows(stack, full_run):
    """Runs last in this module: it leaves a cancelled run behind."""
    import re
    import time

    # VGG16 at 224 px on this CPU: minutes per run (early stopping needs 6 epochs at least),
    # so the child is still training when the cancellation reaches it.
    result = stack.prefect("deployment", "run", "derm/full", "-p", f"csv={full_run['csv']}",
                           "-p", "limit_per_label=8", "-p", "image_size=224", "-p", "epochs=200",
                           "-p", "weights=none", "-p", 'architectures=["vgg16"]', "-p", "seed=7")
    parent_id = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)

    def child():
        runs = [r for r in _flow_runs(stack, "derm-train") if (r.name or "").endswith("-vgg16")
                and r.parent_task_run_id is not None]
        runs = [r for r in runs if r.state and r.state.name == "Running" and str(r.parameters.get("seed")) == "7"]
        return runs[0] if runs else None

    deadline = time.monotonic() + 600
    running = None
    while running is None and time.monotonic() < deadline:
        time.sleep(3)
        running = child()
    assert running is not None, "the training subflow never started"
    stack.prefect("flow-run", "cancel", parent_id)
    deadline = time.monotonic() + 180
    state = None
    while time.monotonic() < deadline:
        state = next(r.state.name for r in _flow_runs(stack, "derm-train") if r.id == running.id)
        if state in ("Cancelled", "Cancelling"):
            break
        time.sleep(3)
    assert state in ("Cancelled", "Cancelling"), state
