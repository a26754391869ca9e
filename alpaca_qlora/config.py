"""Typed, validated parameters from `params.yaml`: a typo or bad value there (or in `dvc exp run -S ...`) fails
before any work, naming the key. What one stage may read of them is alpaca_qlora/stage_params.py's job.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from alpaca_qlora.errors import PipelineError

PARAMS_FILE = "params.yaml"

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_MODEL_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model whose Q4_1 GGUF it converts
Switch = Literal["auto", True, False]  # a speed setting: auto picks it by device, true / false force it


class ConfigError(PipelineError, ValueError):
    """A parameter is missing, unknown or out of range; the message names it and says what is allowed."""


# The sections below have no defaults: params.yaml (the embedded profile) sets every key, and its comments say what
# each one does; a profile (profiles/*.yaml) changes only the keys it lists.
EVERY_KEY = ("Every key must be set: params.yaml (the embedded profile) lists them all with their values, so copy "
             "the missing lines from the project's params.yaml (`git show HEAD:params.yaml`).")


@dataclass(frozen=True)
class DataParams:
    """Where the rows come from, how many train on, and how the held-out eval split is drawn (`data:`)."""

    source: Literal["bundled", "hub", "local"]
    hub_id: str
    hub_revision: str
    hub_file: str
    path: str
    sample_frac: float
    eval_size: int
    seed: int
    template: Literal["alpaca", "instruction_context"]
    overlong: Literal["truncate", "drop"]

    def validate(self) -> None:
        _require(0.0 < self.sample_frac <= 1.0, "data.sample_frac", self.sample_frac, "a fraction in (0, 1]")
        _require(self.eval_size >= 1, "data.eval_size", self.eval_size, "a positive row count")
        _require(self.source != "local" or bool(self.path), "data.path", self.path,
                 "a file under data/external/ when data.source is 'local'")


@dataclass(frozen=True)
class ModelParams:
    """The base model and whether it loads in 4-bit (`model:`)."""

    name: str
    quantization: Literal["auto", "nf4", "none"]

    def validate(self) -> None:
        _require(bool(self.name.strip()), "model.name", self.name, "a hub id, a local directory or " + EMBEDDED_MODEL)


@dataclass(frozen=True)
class LoraParams:
    """The adapter: rank, scaling, dropout and the modules it wraps (`lora:`; PEFT's LoraConfig names)."""

    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]
    bias: Literal["none", "all", "lora_only"]
    use_rslora: bool
    use_dora: bool

    def validate(self) -> None:
        _require(self.r > 0, "lora.r", self.r, "a positive rank")
        _require(self.alpha > 0, "lora.alpha", self.alpha, "a positive scaling numerator")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a probability in [0, 1)")
        _require(len(self.target_modules) > 0, "lora.target_modules", self.target_modules, "a non-empty list")


@dataclass(frozen=True)
class TrainParams:
    """The optimizer, batches, speed switches, checkpoints, logging and launch (`train:`)."""

    learning_rate: float
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    warmup_ratio: float
    epochs: float
    max_steps: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    # auto: on where it pays, i.e. on CUDA (training.resolve_speed_switches); true / false force it
    gradient_checkpointing: Switch
    checkpoint_offload: bool
    frozen_dtype: Literal["compute", "fp32"]
    packing: bool
    liger_kernels: Switch
    seed: int
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    max_seq_length: int
    weight_decay: float
    max_grad_norm: float
    logging_steps: int
    save_steps: int
    resume: Literal["auto", "never"]
    dvclive: bool
    wandb: bool
    wandb_project: str
    distributed: Literal["none", "ddp", "fsdp"]
    num_processes: int

    def validate(self) -> None:
        _require(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "a positive number (e.g. 2e-4)")
        _require(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", self.warmup_ratio, "a fraction in [0, 1)")
        _require(self.epochs > 0, "train.epochs", self.epochs, "a positive number")
        _require(self.max_steps == -1 or self.max_steps > 0, "train.max_steps", self.max_steps,
                 "-1 (use epochs) or a positive step count")
        _require(self.micro_batch_size > 0, "train.micro_batch_size", self.micro_batch_size, "a positive integer")
        _require(self.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps",
                 self.gradient_accumulation_steps, "a positive integer")
        _require(self.max_seq_length >= 16, "train.max_seq_length", self.max_seq_length, "at least 16 tokens")
        _require(self.logging_steps > 0, "train.logging_steps", self.logging_steps, "a positive integer")
        _require(self.save_steps > 0, "train.save_steps", self.save_steps, "a positive integer")
        _require(self.num_processes >= 1, "train.num_processes", self.num_processes, "a positive process count")
        _require(self.distributed != "none" or self.num_processes == 1, "train.num_processes", self.num_processes,
                 "1 when train.distributed is none (set train.distributed=ddp or fsdp to use more processes)")
        _require(self.distributed != "fsdp" or self.num_processes >= 2, "train.num_processes", self.num_processes,
                 "at least 2 with train.distributed=fsdp (one process has nothing to shard with)")
        _require(not self.checkpoint_offload or self.gradient_checkpointing is not False, "train.checkpoint_offload",
                 self.checkpoint_offload, "false when train.gradient_checkpointing is false (it moves checkpoints)")


@dataclass(frozen=True)
class EvalParams:
    """Decoding limits, the short-answer (EM) rule, the decoding path and compare's bootstrap (`eval:`)."""

    # auto: the 99th percentile of the eval references' token counts plus the stop margin, at most the cap
    max_new_tokens: Literal["auto"] | int
    max_new_tokens_cap: int
    # short-answer rows the eval split draws first, so EM rests on at least this many where the data has them
    min_short_answer: int
    batch_size: int
    short_answer_max_words: int
    short_answer_task_types: tuple[str, ...]
    num_examples: int
    # plain: model.generate(); graphed: the same 4-bit layers, static KV cache, decoding step replayed as a CUDA
    # graph; fast: own greedy loop dropping finished rows, with the 4-bit base dequantized once on CUDA (not bitwise
    # the same outputs on GPU); auto: graphed on CUDA (base dequantized once where it fits), plain on CPU.
    # merge_bf16 merges LoRA into the dequantized weights; fold_lora keeps it unmerged beside them, in the compute
    # dtype with its add fused (faster than PEFT's forward). Both change LoRA's precision, so both are opt-in, and
    # they exclude each other.
    generation: Literal["auto", "plain", "fast", "graphed"]
    merge_bf16: bool
    fold_lora: bool
    # compare's paired bootstrap intervals (alpaca_qlora/significance.py): resamples and the generator's seed
    bootstrap_resamples: int
    bootstrap_seed: int

    def validate(self) -> None:
        _require(self.max_new_tokens == "auto" or self.max_new_tokens > 0, "eval.max_new_tokens",
                 self.max_new_tokens, "auto or a positive integer")
        _require(self.max_new_tokens_cap > 0, "eval.max_new_tokens_cap", self.max_new_tokens_cap, "a positive integer")
        _require(self.min_short_answer >= 0, "eval.min_short_answer", self.min_short_answer, "zero or more rows")
        _require(self.batch_size > 0, "eval.batch_size", self.batch_size, "a positive integer")
        _require(self.short_answer_max_words > 0, "eval.short_answer_max_words", self.short_answer_max_words,
                 "a positive integer")
        _require(self.num_examples >= 0, "eval.num_examples", self.num_examples, "zero or more")
        _require(not (self.merge_bf16 and self.fold_lora), "eval.fold_lora", self.fold_lora,
                 "false while eval.merge_bf16 is true (merging and folding LoRA exclude each other)")
        _require(self.bootstrap_resamples >= 10_000, "eval.bootstrap_resamples", self.bootstrap_resamples,
                 "at least 10000 resamples (fewer make the 95% interval's ends noisy)")


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    lora: LoraParams
    train: TrainParams
    eval: EvalParams


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"params: {key} = {value!r} is invalid: expected {expected}.")


def _expected(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " or ".join(map(repr, typing.get_args(annotation)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(annotation, "a value")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the declared type; YAML 1.1 reads `2e-4` as a string, so numbers may come as text."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # e.g. auto or an integer: the first reading that fits
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"params: {key} = {value!r} is invalid: expected "
                          f"{' or '.join(_expected(option) for option in typing.get_args(annotation))}.")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if True in choices and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"  # a switch given on the command line
        if not isinstance(value, (str, bool)) or value not in choices:
            raise ConfigError(f"params: {key} = {value!r} is not one of {', '.join(map(repr, choices))}.")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"params: {key} = {value!r} must be a list of strings.")
        return tuple(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"params: {key} = {value!r} must be true or false.")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"params: {key} = {value!r} must be an integer.")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"params: {key} = {value!r} must be an integer.") from None
        if not isinstance(number, (int, float)) or float(number) != int(number):
            raise ConfigError(f"params: {key} = {value!r} must be an integer.")
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"params: {key} = {value!r} must be a number.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"params: {key} = {value!r} must be a number (e.g. 2e-4).") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"params: {key} = {value!r} must be a string.")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build_section(cls: type, values: Any, section: str) -> Any:
    if values is None:
        raise ConfigError(f"params: section '{section}' is missing or empty. {EVERY_KEY}")
    if not isinstance(values, dict):
        raise ConfigError(f"params: section '{section}' must be a mapping of keys to values, got {values!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"params: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"'{section}' accepts: {', '.join(sorted(known))}."
        )
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values]
    if missing:
        raise ConfigError(f"params: missing key(s) {', '.join(f'{section}.{k}' for k in missing)}. {EVERY_KEY}")
    kwargs = {name: _coerce(value, hints[name], f"{section}.{name}") for name, value in values.items()}
    instance = cls(**kwargs)
    instance.validate()
    return instance


def params_from_mapping(raw: Any) -> Params:
    """Every key of every section must be given: params.yaml holds them all, so no value is written twice."""
    if not isinstance(raw, dict):
        raise ConfigError("params: the file must be a mapping of sections (data, model, lora, train, eval).")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"params: unknown section(s) {', '.join(unknown)}; expected: {', '.join(sections)}.")
    hints = typing.get_type_hints(Params)
    return Params(**{name: _build_section(hints[name], raw.get(name), name) for name in sections})


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: {path} not found; run from the project root, where params.yaml lives.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"params: {path} is not valid YAML: {error}") from error
    return params_from_mapping(raw)


__all__ = [
    "ConfigError", "DataParams", "EvalParams", "LoraParams", "ModelParams", "Params", "TrainParams",
    "EMBEDDED_MODEL", "load_params", "params_from_mapping",
]
