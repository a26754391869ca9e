"""A stage's params: the keys it declared in dvc.yaml, and only those."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alpaca_qlora.config import ConfigError
from alpaca_qlora.profiles import merged, read_yaml
from alpaca_qlora.stage_params import declared_params, stage_params
from support import ROOT
from support.params import embedded_params


@pytest.mark.parametrize("stage", ["evaluate_base", "evaluate_finetuned"])
def test_evaluate_stages_declare_generation_params(stage):
    assert {"eval.generation", "eval.merge_bf16", "eval.fold_lora"} <= set(declared_params(stage))


def _write_project(tmp_path: Path, overrides: dict, stage_params_list: list[str]) -> tuple[Path, Path]:
    """A project whose params.yaml is the embedded profile with `overrides` ({section: {key: value}})."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(merged(read_yaml(ROOT / "params.yaml"), overrides)))
    dvc_file = tmp_path / "dvc.yaml"
    dvc_file.write_text(yaml.safe_dump({"stages": {"demo": {"cmd": "true", "params": stage_params_list}}}))
    return params_file, dvc_file


def test_a_stage_reads_only_what_it_declares(tmp_path):
    params_file, dvc_file = _write_project(tmp_path, {"data": {"sample_frac": 0.2}}, ["data.sample_frac", "lora"])
    view = stage_params("demo", params_file, dvc_file)
    assert view.data.sample_frac == 0.2
    assert view.lora.r == embedded_params().lora.r  # a whole section declared
    with pytest.raises(AttributeError, match="does not declare it"):
        _ = view.data.seed
    with pytest.raises(AttributeError, match="train.learning_rate"):
        _ = view.train.learning_rate


def test_declaring_a_key_the_schema_lacks_fails(tmp_path):
    params_file, dvc_file = _write_project(tmp_path, {}, ["data.samples"])
    with pytest.raises(ConfigError, match="data.samples"):
        stage_params("demo", params_file, dvc_file)


def test_every_declared_param_of_the_real_dag_exists():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for stage in spec["stages"]:
        view = stage_params(stage, ROOT / "params.yaml", ROOT / "dvc.yaml")
        assert view.keys == declared_params(stage, ROOT / "dvc.yaml")


def test_data_stages_never_depend_on_lora_or_train_except_seq_length():
    for stage in ("fetch", "sample", "format"):
        keys = declared_params(stage, ROOT / "dvc.yaml")
        assert not any(key.startswith("lora") for key in keys)
        assert all(not key.startswith("train") or key == "train.max_seq_length" for key in keys)
