"""Profiles: the Mistral profile is the README's real run, and its -S flags make DVC write exactly its values."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from alpaca_qlora.config import ConfigError, load_params
from alpaca_qlora.profiles import main, profile_params, set_param_flags
from support import ROOT
from support.families import FAMILY_LINEAR_NAMES, FAMILY_PROFILE

MISTRAL = ROOT / "profiles" / "mistral-7b.yaml"
PARAMS = ROOT / "params.yaml"
SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def applied_by_dvc(flags: list[str], tmp_path: Path):
    """params.yaml after DVC's own `-S` machinery (Hydra overrides) has applied the flags to a copy."""
    copy = tmp_path / "params.yaml"
    shutil.copy(PARAMS, copy)
    assert flags[::2] == ["-S"] * (len(flags) // 2)
    apply_overrides(copy, flags[1::2])
    return load_params(copy)


def test_the_mistral_profile_is_the_readmes_real_run():
    """README: Mistral-7B-Instruct-v0.2 on 10% of alpaca-cleaned, LoRA r=16 on q,k,v,o,gate,up,down, 2048 tokens,
    1 epoch, W&B logging."""
    params = profile_params(MISTRAL, PARAMS)
    assert (params.model.name, params.model.quantization) == ("mistralai/Mistral-7B-Instruct-v0.2", "nf4")
    assert (params.data.source, params.data.hub_id, params.data.sample_frac) == ("hub", "yahma/alpaca-cleaned", 0.1)
    assert params.lora.r == 16 and set(params.lora.target_modules) == set(SEVEN_PROJECTIONS)
    assert len(params.lora.target_modules) == 7
    assert params.train.max_seq_length == 2048 and params.train.epochs == 1 and params.train.wandb is True
    assert "make mistral" in MISTRAL.read_text().split("\nmodel:")[0]  # the header says how to launch it


def test_the_flags_make_dvc_write_the_profiles_values(tmp_path):
    flags = set_param_flags(MISTRAL, PARAMS)
    listed = yaml.safe_load(MISTRAL.read_text())
    assert [flag.split("=")[0] for flag in flags[1::2]] == [f"{s}.{k}" for s, keys in listed.items() for k in keys]
    assert applied_by_dvc(flags, tmp_path) == profile_params(MISTRAL, PARAMS)
    assert applied_by_dvc(flags, tmp_path) != load_params(PARAMS)


def test_values_that_would_read_as_another_type_survive_the_round_trip(tmp_path):
    profile = tmp_path / "tricky.yaml"
    profile.write_text(yaml.safe_dump({
        "data": {"hub_revision": "1234567", "path": "data/external/my rows.json", "hub_file": "true"},
        "model": {"name": "embedded:smollm2-135m-instruct"},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "train": {"learning_rate": "3e-5", "gradient_checkpointing": "auto", "liger_kernels": False},
    }))
    (tmp_path / "dvc").mkdir()
    assert applied_by_dvc(set_param_flags(profile, PARAMS), tmp_path / "dvc") == profile_params(profile, PARAMS)


def test_a_typo_or_bad_value_in_a_profile_names_the_key(tmp_path):
    profile = tmp_path / "typo.yaml"
    profile.write_text("train:\n  learnin_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="train.learnin_rate"):
        set_param_flags(profile, PARAMS)
    profile.write_text("lora:\n  r: 0\n")
    with pytest.raises(ConfigError, match="lora.r"):
        set_param_flags(profile, PARAMS)
    profile.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="sections"):
        set_param_flags(profile, PARAMS)


def test_the_cli_prints_the_flags_or_runs_a_command_with_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    main([str(MISTRAL)])
    assert capsys.readouterr().out.split() == set_param_flags(MISTRAL, PARAMS)
    ran = []
    monkeypatch.setattr("os.execvp", lambda program, argv: ran.append((program, argv)))
    main([str(MISTRAL), "--", "dvc", "exp", "run", "--name", "mistral-7b"])
    assert ran == [("dvc", ["dvc", "exp", "run", "--name", "mistral-7b", *set_param_flags(MISTRAL, PARAMS)])]


@pytest.mark.parametrize("name", sorted(set(FAMILY_PROFILE.values())))
def test_each_family_profile_validates_targets_its_architecture_and_has_a_make_target(name):
    profile = ROOT / "profiles" / f"{name}.yaml"
    params = profile_params(profile, PARAMS)
    assert params.model.quantization == "nf4" and params.train.max_seq_length == 2048 and params.train.epochs == 1
    for family in (family for family, profile_name in FAMILY_PROFILE.items() if profile_name == name):
        assert set(params.lora.target_modules) <= set(FAMILY_LINEAR_NAMES[family]) - {"lm_head"}
    assert f"make {name}\n" in profile.read_text().split("\nmodel:")[0]
    makefile = (ROOT / "Makefile").read_text()
    assert name in makefile.split("FAMILY_PROFILES := ")[1].splitlines()[0].split()
