"""The deployment declarations load with Prefect's own parser and name real entrypoints and
parameters; the Kubernetes variant's job variables fit its base job template (no cluster)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.utilities.callables import parameter_schema_from_entrypoint

from dermflow import config as flow_params

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DECLARATIONS = [ROOT / "deployments" / "prefect.yaml", ROOT / "deployments" / "k8s" / "prefect.yaml"]
EXPECTED = {"derm/full", "derm/fetch", "derm/refetch", "derm/retrain", "derm-train/default", "derm-tune/worker",
            "derm-tune-run/default", "derm-rescore/default"}
FLOW_NAMES = {"flows/derm.py:derm": "derm", "flows/train.py:derm_train": "derm-train",
              "flows/tune.py:derm_tune_worker": "derm-tune", "flows/tune.py:derm_tune_run": "derm-tune-run",
              "flows/rescore.py:derm_rescore": "derm-rescore"}


def _load(path: Path) -> PrefectYamlModel:
    return PrefectYamlModel.model_validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("path", DECLARATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_declarations_parse_and_name_real_entrypoints_and_parameters(path):
    model = _load(path)
    names = set()
    for deployment in model.deployments:
        entrypoint = deployment.entrypoint
        file_name, function = entrypoint.split(":")
        assert (ROOT / file_name).is_file(), f"{deployment.name}: {file_name} does not exist"
        schema = parameter_schema_from_entrypoint(str(ROOT / file_name) + ":" + function)
        unknown = set(deployment.parameters or {}) - set(schema.properties)
        assert not unknown, f"{deployment.name}: parameters {unknown} are not parameters of {entrypoint}"
        names.add(f"{FLOW_NAMES[entrypoint]}/{deployment.name}")
    assert names == EXPECTED


def test_flow_names_match_the_decorators():
    for entrypoint, name in FLOW_NAMES.items():
        source = (ROOT / entrypoint.split(":")[0]).read_text()
        assert f'@flow(name="{name}"' in source, entrypoint


def test_retrain_is_weekly_and_only_it_is_scheduled():
    for path in DECLARATIONS:
        scheduled = {d.name: d.schedules for d in _load(path).deployments if d.schedules}
        assert list(scheduled) == ["retrain"]
        cron = scheduled["retrain"][0].model_dump(exclude_unset=True)["cron"]
        assert len(cron.split()) == 5 and cron.split()[2:4] == ["*", "*"] and cron.split()[4] != "*"


def test_the_retrain_schedule_starts_off_and_takes_a_saved_configuration():
    """Issue 15: the first `make up` must not switch on a weekly full job on the published CSV."""
    for path in DECLARATIONS:
        [retrain] = [d for d in _load(path).deployments if d.name == "retrain"]
        assert retrain.schedules[0].model_dump(exclude_unset=True)["active"] is False
        assert retrain.parameters == {"mode": "retrain", "config": None}


def test_architecture_vocabulary_matches_the_registry():
    from typing import get_args

    from dermflow.modeling.models import list_architectures

    assert set(get_args(flow_params.ArchitectureName)) == set(list_architectures())
    assert set(flow_params.REPORT_ARCHITECTURES) <= set(list_architectures())


def test_kubernetes_job_variables_fit_the_base_job_template():
    template = json.loads((ROOT / "deployments" / "k8s" / "base-job-template.json").read_text())
    variables = template["variables"]
    declared = set(variables["properties"])
    placeholders = set(re.findall(r"{{\s*([\w]+)\s*}}", json.dumps(template["job_configuration"])))
    assert placeholders <= declared, f"undeclared placeholders: {placeholders - declared}"
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu }}"
    gpu_runs = 0
    for deployment in _load(DECLARATIONS[1]).deployments:
        job_variables = dict(deployment.work_pool.job_variables)
        job_variables["image"] = "registry.example.org/dermflow:test"  # resolved at deploy time
        jsonschema.validate(job_variables, {k: v for k, v in variables.items() if k != "required"} | {"required": []})
        if job_variables["gpu"] >= 1:
            gpu_runs += 1
            assert deployment.entrypoint in ("flows/train.py:derm_train", "flows/tune.py:derm_tune_worker",
                                             "flows/tune.py:derm_tune_run", "flows/rescore.py:derm_rescore")
    assert gpu_runs == 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpu": -1}, variables)
