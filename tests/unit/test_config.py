"""The typed run configuration: each default declared once, the flows' signatures agree with
it, and every parameter of `derm` has a description for the UI's run form."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema
from pydantic import ValidationError

from dermflow.config import (
    DEFAULT_EPOCHS,
    MAX_EPOCHS,
    RUN_DEFAULTS,
    RunConfig,
    SearchOptions,
    TrainConfig,
    TuningPlan,
)

pytestmark = pytest.mark.unit


def _flows():
    from flows.derm import derm
    from flows.fetch import fetch_images
    from flows.train import derm_train
    from flows.tune import tune_architecture

    # (flow, the models whose fields its parameters are, first match wins)
    return {
        "derm": (derm, [RunConfig]),
        "derm-train": (derm_train, [TrainConfig]),
        "derm-tune-search": (tune_architecture, [TrainConfig, TuningPlan]),
        "derm-fetch": (fetch_images, [RunConfig]),
    }


def _model_fields(model) -> dict:
    return model.parameter_fields() if model is RunConfig else model.model_fields


def _model_hint(model, name: str):
    if model is RunConfig:
        for section in [RunConfig, *RunConfig.sections().values()]:
            hints = typing.get_type_hints(section, include_extras=True)
            if name in hints and name not in RunConfig.sections():
                return hints[name]
    return typing.get_type_hints(model, include_extras=True)[name]


@pytest.mark.parametrize("flow_name", ["derm", "derm-train", "derm-tune-search", "derm-fetch"])
def test_flow_signatures_agree_with_the_config(flow_name):
    flow, models = _flows()[flow_name]
    hints = typing.get_type_hints(flow.fn, include_extras=True)
    checked = 0
    for name, parameter in inspect.signature(flow.fn).parameters.items():
        model = next((m for m in models if name in _model_fields(m)), None)
        if model is None:
            continue
        field = _model_fields(model)[name]
        if parameter.default is not inspect.Parameter.empty:
            assert parameter.default == field.get_default(call_default_factory=True), (
                f"{flow_name}.{name}: default {parameter.default!r} is not the config's")
        assert hints[name] == _model_hint(model, name), f"{flow_name}.{name}: type or bounds differ from the config's"
        checked += 1
    assert checked >= 3


def test_derm_takes_exactly_the_run_configs_parameters():
    from flows.derm import derm

    assert set(inspect.signature(derm.fn).parameters) == set(RunConfig.parameter_fields())


@pytest.mark.parametrize("flow_name", ["derm", "derm-train", "derm-tune-search"])
def test_every_parameter_has_a_description_in_the_prefect_schema(flow_name):
    flow, _ = _flows()[flow_name]
    properties = parameter_schema(flow).model_dump()["properties"]
    missing = [name for name, schema in properties.items() if not schema.get("description")]
    assert not missing
    if flow_name == "derm":
        assert properties["image_size"]["maximum"] == 1024 and properties["image_size"]["default"] == 256


def test_flat_parameters_round_trip_and_unknown_names_fail():
    config = RunConfig.from_parameters(image_size=64, epochs=1, architectures=["baseline_cnn"], tune=True)
    assert config.training.image_size == 64 and config.tuning.tune and config.fetch.shard_size == 256
    assert RunConfig.from_parameters(**config.parameters()) == config
    with pytest.raises(ValidationError, match="imagesize"):
        RunConfig.from_parameters(imagesize=64)
    with pytest.raises(ValidationError, match="image_size"):
        RunConfig.from_parameters(image_size=16)
    with pytest.raises(ValidationError, match="architectures"):
        RunConfig.from_parameters(architectures=[])


def test_stored_config_reloads():
    config = RunConfig.from_parameters(csv="s3://bucket/rows.csv", budget_minutes=15)
    assert RunConfig.model_validate(config.model_dump(mode="json")) == config


def test_final_epochs_and_deadline():
    assert RunConfig().final_epochs() == DEFAULT_EPOCHS
    assert RunConfig.from_parameters(budget_minutes=10).final_epochs() == MAX_EPOCHS
    assert RunConfig.from_parameters(budget_minutes=10, epochs=7).final_epochs() == 7
    assert RunConfig.from_parameters(budget_minutes=2).deadline(100.0) == 220.0
    assert RunConfig().deadline(100.0) is None


def test_one_default_per_setting_across_models():
    """Settings shared by several models have the same default in each."""
    train, run = TrainConfig(), RUN_DEFAULTS
    for name in ("image_size", "batch_size", "weights", "seed"):
        assert getattr(train, name) == run[name], name
    assert TuningPlan().tuner == SearchOptions().tuner == run["tuner"]


def _literal_defaults(tree: ast.AST):
    """(name, default node) of every function parameter and class field with a default."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            yield from ((arg.arg, default) for arg, default
                        in zip(positional[len(positional) - len(args.defaults):], args.defaults))
            yield from ((arg.arg, default) for arg, default in zip(args.kwonlyargs, args.kw_defaults)
                        if default is not None)
        elif isinstance(node, ast.ClassDef):
            yield from ((field.target.id, field.value) for field in node.body
                        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                        and field.value is not None)


def test_the_core_takes_run_settings_defaults_from_the_config():
    """A parameter named after a run setting does not repeat the setting's default as a literal:
    it refers to `RUN_DEFAULTS` or `TRAIN_DEFAULTS`, so a default changed in the config changes
    everywhere (a different literal is a different default, e.g. a function's `seed=0`)."""
    defaults = {**TrainConfig().model_dump(), **RUN_DEFAULTS}
    core = Path(__file__).resolve().parents[2] / "dermflow"
    repeated = [
        f"{path.relative_to(core.parent)}:{default.lineno} {name}={default.value!r}"
        for path in sorted(core.rglob("*.py")) if path.name != "config.py"
        for name, default in _literal_defaults(ast.parse(path.read_text()))
        if name in defaults and isinstance(default, ast.Constant) and default.value is not None
        and type(default.value) is type(defaults[name]) and default.value == defaults[name]
    ]
    assert repeated == [], "take these defaults from dermflow.config: " + ", ".join(repeated)


def test_train_config_rejects_unknown_and_bad_values():
    assert TrainConfig.from_dict({"architecture": "vgg16", "epochs": 3}).to_dict()["epochs"] == 3
    with pytest.raises(ValidationError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValidationError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValidationError, match="architecture"):
        TrainConfig(architecture="resnet9000")
