from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing

import pytest

from alpaca_qlora.config import ConfigError, Params, load_params, params_from_mapping
from alpaca_qlora.generation import resolve_generation_method
from alpaca_qlora.profiles import read_yaml
from support import ROOT
from support.params import embedded_params


def test_committed_params_are_valid_and_embedded():
    params = load_params(ROOT / "params.yaml")
    assert params.model.name == "embedded:smollm2-135m-instruct"
    assert params.data.source == "bundled"
    assert params.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"lora": {"r": 0}}, "lora.r = 0"),
        ({"lora": {"r": -4}}, "lora.r = -4"),
        ({"data": {"sample_frac": 0}}, "data.sample_frac"),
        ({"data": {"sample_frac": 1.5}}, "data.sample_frac"),
        ({"data": {"template": "vicuna"}}, "data.template = 'vicuna' is not one of 'alpaca', 'instruction_context'"),
        ({"lora": {"rank": 8}}, "unknown key(s) lora.rank"),
        ({"optimizer": {}}, "unknown section(s) optimizer"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate = 'fast' must be a number"),
        ({"train": {"micro_batch_size": 2.5}}, "train.micro_batch_size = 2.5 must be an integer"),
        ({"train": {"wandb": "yes"}}, "train.wandb = 'yes' must be true or false"),
        ({"data": {"source": "local"}}, "data.path"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(raw, message):
    with pytest.raises(ConfigError) as error:
        embedded_params(**raw)
    assert message in str(error.value)


@pytest.mark.parametrize("section", ["data", "model", "lora", "train", "eval"])
def test_a_missing_key_or_section_is_named_not_filled_in(section):
    """No key has a default in the code: params.yaml sets each one, so a missing one is an error naming it."""
    full = read_yaml(ROOT / "params.yaml")
    first_key = next(iter(full[section]))
    without_key = {**full, section: {k: v for k, v in full[section].items() if k != first_key}}
    with pytest.raises(ConfigError, match=rf"missing key\(s\) {section}\.{first_key}\b.*params\.yaml"):
        params_from_mapping(without_key)
    for without_section in ({k: v for k, v in full.items() if k != section}, {**full, section: None}):
        with pytest.raises(ConfigError, match=rf"section '{section}' is missing.*params\.yaml"):
            params_from_mapping(without_section)


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ConfigError, match="project root"):
        load_params(tmp_path / "params.yaml")


def test_speed_switches_take_auto_true_false_and_nothing_else():
    embedded = embedded_params().train  # params.yaml leaves both to the device
    assert embedded.gradient_checkpointing == "auto" and embedded.liger_kernels == "auto"
    params = embedded_params(train={"gradient_checkpointing": "true", "liger_kernels": False})
    assert params.train.gradient_checkpointing is True and params.train.liger_kernels is False
    for bad in ("yes", 1, "on"):
        with pytest.raises(ConfigError, match="train.liger_kernels"):
            embedded_params(train={"liger_kernels": bad})
    with pytest.raises(ConfigError, match="train.checkpoint_offload"):
        embedded_params(train={"gradient_checkpointing": False, "checkpoint_offload": True})


def test_all_linear_is_accepted_alone_as_a_word_or_a_list_and_refused_beside_names():
    for value in ("all-linear", ["all-linear"]):
        assert embedded_params(lora={"target_modules": value}).lora.target_modules == ("all-linear",)
    with pytest.raises(ConfigError, match=r"lora.target_modules = \('all-linear', 'q_proj'\).*all-linear alone"):
        embedded_params(lora={"target_modules": ["all-linear", "q_proj"]})


def test_fsdp_needs_at_least_two_processes():
    with pytest.raises(ConfigError, match="at least 2 with train.distributed=fsdp"):
        embedded_params(train={"distributed": "fsdp", "num_processes": 1})
    assert embedded_params(train={"distributed": "fsdp", "num_processes": 2}).train.num_processes == 2


def _field_docstrings(cls: type) -> dict[str, str]:
    """Each annotated field of a dataclass and the string literal right under it (litgpt's per-field docs)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: following.value.value
            for node, following in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)}


def test_every_param_is_documented_on_its_dataclass_field():
    for section in dataclasses.fields(Params):
        cls = typing.get_type_hints(Params)[section.name]
        documented = _field_docstrings(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not documented.get(f.name, "").strip()]
        assert not undocumented, f"{section.name}: fields without a docstring: {undocumented}"


def _yaml_comment_choices() -> dict[str, set[str]]:
    """params.yaml's `key: value  # a | b | c` reminders (continued on comment-only lines): key -> choices named."""
    comments: dict[str, str] = {}
    section = key = None
    for line in (ROOT / "params.yaml").read_text(encoding="utf-8").splitlines():
        if re.match(r"^\w+:", line):
            section = line.split(":")[0]
        elif match := re.match(r"^  (\w+):[^#]*#(.*)$", line):
            key = f"{section}.{match.group(1)}"
            comments[key] = match.group(2)
        elif key and re.match(r"^\s+#", line):
            comments[key] += " " + line.split("#", 1)[1]
        else:
            key = None
    return {key: {re.match(r"\s*([\w-]+)", part).group(1) for part in text.split("|")}
            for key, text in comments.items() if "|" in text}


def test_params_yaml_reminders_name_exactly_the_choices_the_schema_accepts():
    hints = typing.get_type_hints(Params)
    checked = 0
    for key, named in _yaml_comment_choices().items():
        section, name = key.split(".")
        annotation = typing.get_type_hints(hints[section])[name]
        if typing.get_origin(annotation) is not typing.Literal:
            continue
        accepted = {str(choice).lower() for choice in typing.get_args(annotation)}
        assert named == accepted, f"params.yaml on {key} names {sorted(named)}; the schema: {sorted(accepted)}"
        checked += 1
    assert checked >= 8 and dataclasses.is_dataclass(Params)


def test_eval_generation_params_validated():
    embedded = embedded_params().eval  # params.yaml: auto, which is our fast loop on CPU; LoRA kept apart
    assert embedded.generation == "auto" and embedded.merge_bf16 is False and embedded.fold_lora is False
    assert resolve_generation_method(embedded.generation, "cpu") == "fast"
    params = embedded_params(eval={"generation": "fast", "merge_bf16": "true"})
    assert params.eval.generation == "fast" and params.eval.merge_bf16 is True
    assert embedded_params(eval={"generation": "plain"}).eval.generation == "plain"
    with pytest.raises(ConfigError, match="eval.generation"):
        embedded_params(eval={"generation": "turbo"})
    with pytest.raises(ConfigError, match="eval.merge_bf16"):
        embedded_params(eval={"merge_bf16": "yes"})
    assert embedded_params(eval={"fold_lora": "true"}).eval.fold_lora is True
    with pytest.raises(ConfigError, match="exclude each other"):
        embedded_params(eval={"merge_bf16": "true", "fold_lora": "true"})


@pytest.mark.parametrize(("section", "key", "value"), [
    ("train", "max_steps", "nan"), ("train", "max_steps", "inf"), ("train", "max_steps", float("nan")),
    ("train", "epochs", "inf"), ("train", "epochs", "nan"), ("train", "learning_rate", "nan"),
    ("train", "max_grad_norm", "inf"), ("lora", "dropout", "nan"), ("data", "sample_frac", "nan"),
    ("lora", "r", "inf"),
])
def test_a_non_finite_number_is_refused_naming_its_key(section, key, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{key} = .* finite"):
        embedded_params(**{section: {key: value}})


@pytest.mark.parametrize("value", ["1e38", 2.0])
def test_a_learning_rate_beyond_any_usable_one_is_refused(value):
    with pytest.raises(ConfigError, match=r"train\.learning_rate = .* at most 1"):
        embedded_params(train={"learning_rate": value})


def test_usual_learning_rates_stay_accepted():
    assert embedded_params(train={"learning_rate": "2e-4"}).train.learning_rate == 2e-4
    assert embedded_params(train={"learning_rate": 1.0}).train.learning_rate == 1.0
