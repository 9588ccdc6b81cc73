"""Nothing but S3 keys and parameters passes between hosts: the project root of an installed
package, local-path inputs staged to the bucket (or refused naming the parameter), the tuning
project directory of the worker's own host, and the oracle address setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


# --- the project root -----------------------------------------------------------------------
def test_project_root_is_the_env_var_when_set(tmp_path):
    from dermflow.settings import project_root

    assert project_root({"DERMFLOW_PROJECT_ROOT": str(tmp_path)}, Path("/nowhere/dermflow"), Path("/")) == tmp_path


def test_project_root_is_the_checkout_for_a_source_tree(tmp_path):
    from dermflow.settings import project_root

    (tmp_path / "dermflow").mkdir()
    (tmp_path / "dermflow" / "__init__.py").write_text("")
    (tmp_path / "pyproject.toml").write_text("")
    assert project_root({}, tmp_path / "dermflow", Path("/")) == tmp_path


def test_an_installed_package_never_points_into_site_packages(tmp_path):
    from dermflow.settings import project_root

    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "dermflow").mkdir(parents=True)
    (site / "dermflow" / "__init__.py").write_text("")
    work = tmp_path / "work"
    work.mkdir()
    assert project_root({}, site / "dermflow", work) == work


def test_the_pull_step_keeps_the_workers_folder_and_enters_the_installed_flows(tmp_path, monkeypatch):
    """Prefect's process worker starts each flow run in a fresh temporary folder: the project
    root is found from the folder the worker was started from (`PWD`), never from that one."""
    import flows
    from dermflow.ops.steps import use_installed_flows
    from dermflow.settings import project_root

    worker_dir, run_dir = tmp_path / "worker", tmp_path / "tmp123prefect"
    worker_dir.mkdir()
    run_dir.mkdir()
    monkeypatch.delenv("DERMFLOW_PROJECT_ROOT", raising=False)
    monkeypatch.setenv("PWD", str(worker_dir))
    monkeypatch.chdir(run_dir)
    try:
        result = use_installed_flows()
        assert Path(result["directory"]) == Path(flows.__file__).resolve().parents[1]
        assert Path.cwd() == Path(result["directory"])
        # this checkout when imported from one (its .env), else the worker's folder
        assert os.environ["DERMFLOW_PROJECT_ROOT"] == str(project_root(cwd=worker_dir))
        assert os.environ["DERMFLOW_PROJECT_ROOT"] != str(run_dir)
    finally:
        os.chdir(tmp_path)


def test_dermflow_up_tells_its_workers_flow_runs_where_the_project_is(tmp_path, monkeypatch):
    """A worker started by `dermflow up` passes its folder on as DERMFLOW_PROJECT_ROOT, so its flow
    runs (in Prefect's temporary folders) read the `.env` that `make up` wrote: its S3 keys."""
    from dermflow.ops import stack

    started = {}
    monkeypatch.setattr(stack.ManagedProcess, "pid", lambda self: None)
    monkeypatch.setattr(stack.ManagedProcess, "start",
                        lambda self, argv, env=None, cwd=None: started.update(argv=argv, env=env, cwd=cwd) or 1)
    monkeypatch.delenv("DERMFLOW_PROJECT_ROOT", raising=False)
    worker = stack.Worker("orchestrator", "dermflow", ["default"], tmp_path / "run", env={"CUDA_VISIBLE_DEVICES": ""})
    assert worker.start("http://127.0.0.1:4200/api", tmp_path / "project")
    assert started["cwd"] == tmp_path / "project"
    assert started["env"]["DERMFLOW_PROJECT_ROOT"] == str(tmp_path / "project")
    assert started["env"]["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("DERMFLOW_PROJECT_ROOT", str(tmp_path / "chosen"))  # the user's choice wins
    worker.start("http://127.0.0.1:4200/api", tmp_path / "project")
    assert started["env"]["DERMFLOW_PROJECT_ROOT"] == str(tmp_path / "chosen")


def test_the_oracle_host_is_a_setting(monkeypatch):
    from dermflow.settings import load_settings

    assert load_settings().tuning_oracle_host == "127.0.0.1"
    monkeypatch.setenv("DERMFLOW_TUNING_ORACLE_HOST", "10.20.0.1")
    assert load_settings().tuning_oracle_host == "10.20.0.1"


# --- local inputs ---------------------------------------------------------------------------
def test_a_missing_local_path_is_refused_naming_the_parameter(tmp_path):
    from dermflow.errors import is_transient
    from dermflow.inputs import InputError, check_local, is_local

    assert is_local(str(tmp_path / "x.csv")) and not is_local("s3://b/k") and not is_local("imagenet")
    assert not is_local(None) and not is_local("https://h/x.csv")
    with pytest.raises(InputError, match=r"images='/no/such/archive.zip'.*s3://") as caught:
        check_local("images", "/no/such/archive.zip")
    assert not is_transient(caught.value)


def test_a_staged_file_and_folder_are_readable_by_uri(bucket, tmp_path):
    from dermflow.inputs import local_copy, stage

    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"weights-1")
    uri = stage(bucket, weights)
    assert uri.startswith(f"s3://{bucket.bucket}/private/inputs/") and uri.endswith("/w.weights.h5")
    assert stage(bucket, weights) == uri  # content-addressed: staged once
    copy = local_copy(bucket, uri, tmp_path / "cache")
    assert copy.read_bytes() == b"weights-1" and tmp_path / "cache" in copy.parents
    weights.write_bytes(b"weights-2")
    assert stage(bucket, weights) != uri

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"a")
    (folder / "sub" / "b.jpg").write_bytes(b"b")
    prefix_uri = stage(bucket, folder)
    assert prefix_uri.endswith("/")
    prefix = bucket.key_of(prefix_uri)
    assert sorted(bucket.list_keys(prefix)) == [prefix + "a.jpg", prefix + "sub/b.jpg"]
    assert bucket.exists(prefix.rstrip("/") + ".complete")


def test_the_run_stages_csv_and_weights_and_images_only_for_remote_shards(bucket, tmp_path, harness):
    from prefect import flow

    from dermflow.inputs import InputError
    from tasks.inputs import stage_run_inputs

    @flow
    def stage_flow(csv, images, weights, shards_elsewhere):
        return stage_run_inputs(csv, images, weights, shards_elsewhere)

    csv = tmp_path / "rows.csv"
    csv.write_text("md5hash,label\n")
    weights = tmp_path / "b.weights.h5"
    weights.write_bytes(b"w")
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.jpg").write_bytes(b"x")

    here = stage_flow(str(csv), str(images), str(weights), shards_elsewhere=False)
    assert here["csv"].startswith("s3://") and here["weights"].startswith("s3://")
    assert here["images"] == str(images)  # the import shards read it on this host
    remote = stage_flow(str(csv), str(images), "imagenet", shards_elsewhere=True)
    assert remote["images"].startswith("s3://") and remote["images"].endswith("/")
    assert remote["weights"] == "imagenet"
    kept = stage_flow("https://h/x.csv", None, "none", shards_elsewhere=True)
    assert kept == {"csv": "https://h/x.csv", "images": None, "weights": "none"}
    with pytest.raises(InputError, match="csv="):
        stage_flow(str(tmp_path / "missing.csv"), None, "none", shards_elsewhere=False)


# --- tuning ---------------------------------------------------------------------------------
def test_a_tuning_worker_uses_its_own_hosts_cache_not_the_chiefs(tmp_path, bucket):
    from dermflow.modeling.tuning import SearchSpec
    from dermflow.settings import load_settings

    spec = SearchSpec(architecture="baseline_cnn", num_classes=3, image_size=32, weights="none",
                      tuning_id="t1", directory="/home/chief/.dermflow/cache/tuning")
    here = load_settings(cache_dir=tmp_path / "worker-cache")
    moved = spec.on_this_host(here)
    assert moved.project_dir == tmp_path / "worker-cache" / "tuning" / "t1"
    assert moved.tuning_id == spec.tuning_id

    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"w")
    from dermflow.inputs import stage

    uri = stage(bucket, weights)
    local = spec.model_copy(update={"weights": uri}).with_local_weights(bucket, here)
    assert Path(local.weights).read_bytes() == b"w" and (tmp_path / "worker-cache") in Path(local.weights).parents
