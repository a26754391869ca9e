"""Typed, validated parameters from `params.yaml`: a typo or bad value there (or in `dvc exp run -S ...`) fails
before any work, naming the key. What one stage may read of them is alpaca_qlora/stage_params.py's job.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from alpaca_qlora.coercion import coerce
from alpaca_qlora.errors import ConfigError

PARAMS_FILE = "params.yaml"

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_MODEL_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model whose Q4_1 GGUF it converts
# AdamW's step is about the learning rate per weight whatever the gradient's scale, so a rate above 1 moves every
# weight by more than its own size each step: the loss overflows (as 1e38 did) rather than trains.
MAX_LEARNING_RATE = 1.0
ALL_LINEAR = "all-linear"  # lora.target_modules shorthand, PEFT's: every linear layer but the output head
Switch = Literal["auto", True, False]  # a speed setting: auto picks it by device, true / false force it


# The sections below have no defaults: params.yaml (the embedded profile) sets every key, and its comments say what
# each one does; a profile (profiles/*.yaml) changes only the keys it lists.
EVERY_KEY = ("Every key must be set: params.yaml (the embedded profile) lists them all with their values, so copy "
             "the missing lines from the project's params.yaml (`git show HEAD:params.yaml`).")


@dataclass(frozen=True)
class DataParams:
    """Where the rows come from, how many train on, and how the held-out eval split is drawn (`data:`)."""

    source: Literal["bundled", "hub", "local"]
    """Where the rows come from: the bundled set, the hub data set (hub_id), or a file under data/external/."""
    hub_id: str
    """The hub data set for source=hub (yahma/alpaca-cleaned)."""
    hub_revision: str
    """Branch, tag or commit sha of hub_id; pin a sha for reproducibility (fetch records the resolved one)."""
    hub_file: str
    """The data file inside the hub repository."""
    path: str
    """For source=local: a .json/.jsonl/.parquet under data/external/ (a URL: `dvc import-url` it there)."""
    sample_frac: float
    """Share of the fetched rows (after the eval split) used for training, in (0, 1]."""
    eval_size: int
    """Held-out rows, stratified by task type, never sharing a prompt with training."""
    seed: int
    """Seed of the eval split and the training sample."""
    template: Literal["alpaca", "instruction_context"]
    """The prompt template (alpaca_qlora/data/prompts.py); saved with the adapter."""
    overlong: Literal["truncate", "drop"]
    """Rows longer than train.max_seq_length: cut the response (no EOS), or drop the row."""

    def validate(self) -> None:
        _require(0.0 < self.sample_frac <= 1.0, "data.sample_frac", self.sample_frac, "a fraction in (0, 1]")
        _require(self.eval_size >= 1, "data.eval_size", self.eval_size, "a positive row count")
        _require(self.source != "local" or bool(self.path), "data.path", self.path,
                 "a file under data/external/ when data.source is 'local'")


@dataclass(frozen=True)
class ModelParams:
    """The base model and whether it loads in 4-bit (`model:`)."""

    name: str
    """A hub id, a local model directory, or embedded:smollm2-135m-instruct (shipped on PyPI)."""
    quantization: Literal["auto", "nf4", "none"]
    """auto: NF4 where bitsandbytes supports the device; nf4 forces it; none loads unquantized."""

    def validate(self) -> None:
        _require(bool(self.name.strip()), "model.name", self.name, "a hub id, a local directory or " + EMBEDDED_MODEL)


@dataclass(frozen=True)
class LoraParams:
    """The adapter: rank, scaling, dropout and the modules it wraps (`lora:`; PEFT's LoraConfig names)."""

    r: int
    """LoRA rank."""
    alpha: int
    """Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: tuple[str, ...]
    """Names of the linear layers that get adapters (PEFT matches them by suffix), or all-linear alone: PEFT's
    every linear layer but the output head (metrics/train.json records the names it resolves to)."""
    bias: Literal["none", "all", "lora_only"]
    """Which biases train (PEFT's meaning)."""
    use_rslora: bool
    """Rank-stabilized scaling, alpha / sqrt(r)."""
    use_dora: bool
    """Weight-decomposed LoRA (DoRA)."""

    def validate(self) -> None:
        _require(self.r > 0, "lora.r", self.r, "a positive rank")
        _require(self.alpha > 0, "lora.alpha", self.alpha, "a positive scaling numerator")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a probability in [0, 1)")
        _require(len(self.target_modules) > 0, "lora.target_modules", self.target_modules, "a non-empty list")
        _require(ALL_LINEAR not in self.target_modules or len(self.target_modules) == 1, "lora.target_modules",
                 self.target_modules, f"{ALL_LINEAR} alone (it already names every linear layer) or a list of names")


# Train keys that decide only how this machine holds the run, not what it learns: left out of the run's fingerprint
# (a resumed run may change them) and of the adapter's card.
MACHINE_ONLY_TRAIN_KEYS = frozenset({"memory_budget_gib", "fsdp_offload"})


@dataclass(frozen=True)
class TrainParams:
    """The optimizer, batches, speed switches, checkpoints, logging and launch (`train:`)."""

    learning_rate: float
    """Peak learning rate of the AdamW optimizer."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    """The Trainer's schedule after warm-up."""
    warmup_ratio: float
    """Share of the steps spent warming up, in [0, 1)."""
    epochs: float
    """Passes over the training rows (ignored when max_steps is set)."""
    max_steps: int
    """-1: run for `epochs`; a positive count stops there."""
    micro_batch_size: int
    """Rows per device step; with packing, bins of max_seq_length tokens."""
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step; the loss is normalized by labelled tokens across them."""
    gradient_checkpointing: Switch
    """Recompute each layer in backward; auto: on for CUDA, off on CPU (training.model)."""
    memory_budget_gib: Literal["auto"] | float
    """GPU memory training may use; gradient_checkpointing auto keeps the layers that fit (auto: the card less 5%)."""
    checkpoint_offload: bool
    """With gradient checkpointing: the layers' checkpoints wait in pinned host memory."""
    frozen_dtype: Literal["compute", "fp32"]
    """compute: frozen embeddings, norms and lm_head stay in the compute dtype; fp32: PEFT's upcast."""
    packing: bool
    """Padding-free micro-batches: rows packed into bins, attention kept within each row."""
    liger_kernels: Switch
    """Liger's Triton kernels incl. fused linear cross-entropy; auto: on for CUDA when installed."""
    fused_lora: Switch
    """Each LoRA projection as one autograd function (training.fused_lora); auto: on for CUDA, without fsdp, for
    plain LoRA with lora.dropout 0."""
    seed: int
    """The Trainer's seed (LoRA init, dropout, bin order)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    """Compute dtype; auto: bf16 on GPUs that have it, fp16 on others, fp32 on CPU."""
    max_seq_length: int
    """Tokens per row at most (and per packed bin)."""
    weight_decay: float
    """AdamW's weight decay."""
    max_grad_norm: float
    """Gradient clipping norm; 0 turns clipping off."""
    logging_steps: int
    """Steps between logged losses (curves, W&B)."""
    save_steps: int
    """Steps between the checkpoints an interrupted run resumes from."""
    resume: Literal["auto", "never"]
    """auto: continue from the last checkpoint of an interrupted run; never: start over."""
    dvclive: bool
    """Loss and learning-rate curves for `dvc plots` (metrics/train_log); needs DVC installed."""
    wandb: bool
    """W&B logging (offline mode unless WANDB_API_KEY is set)."""
    wandb_project: str
    """The W&B project runs are logged to."""
    distributed: Literal["none", "ddp", "fsdp"]
    """none, or ddp / fsdp: the stage re-executes itself under `accelerate launch`."""
    num_processes: int
    """Processes (GPUs) for ddp / fsdp; the global batch is micro x accumulation x this."""
    fsdp_offload: bool
    """With fsdp: each process's shard of the base waits in host memory and is copied in per layer (smaller cards)."""

    def validate(self) -> None:
        _require(0 < self.learning_rate <= MAX_LEARNING_RATE, "train.learning_rate", self.learning_rate,
                 f"a positive number at most {MAX_LEARNING_RATE:g} (e.g. 2e-4)")
        _require(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", self.warmup_ratio, "a fraction in [0, 1)")
        _require(self.epochs > 0, "train.epochs", self.epochs, "a positive number")
        _require(self.max_steps == -1 or self.max_steps > 0, "train.max_steps", self.max_steps,
                 "-1 (use epochs) or a positive step count")
        _require(self.memory_budget_gib == "auto" or 0 < self.memory_budget_gib < float("inf"),
                 "train.memory_budget_gib", self.memory_budget_gib, "auto or a positive number of GiB")
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
        _require(not self.fsdp_offload or self.distributed == "fsdp", "train.fsdp_offload", self.fsdp_offload,
                 "false unless train.distributed is fsdp (it offloads FSDP's shards)")
        _require(not self.checkpoint_offload or self.gradient_checkpointing is not False, "train.checkpoint_offload",
                 self.checkpoint_offload, "false when train.gradient_checkpointing is false (it moves checkpoints)")


@dataclass(frozen=True)
class EvalParams:
    """Decoding limits, the short-answer (EM) rule, the decoding path and compare's bootstrap (`eval:`)."""

    max_new_tokens: Literal["auto"] | int
    """auto: the 99th percentile of the eval references' token counts plus the stop margin, at most the cap."""
    max_new_tokens_cap: int
    """The most tokens auto may choose (the share of references it cuts is in the metrics)."""
    min_short_answer: int
    """Short-answer rows the eval split draws first, so EM rests on at least this many where they exist."""
    batch_size: int
    """Prompts generated together."""
    short_answer_max_words: int
    """A reference of at most this many words is a short answer, scored by EM."""
    short_answer_task_types: tuple[str, ...]
    """Task types whose short references count for EM (data without task types: length alone)."""
    num_examples: int
    """Wins and losses the report shows."""
    generation: Literal["auto", "plain", "fast", "graphed"]
    """plain: model.generate(); graphed: static KV cache + CUDA graph; fast: own loop; auto: graphed on CUDA."""
    merge_bf16: bool
    """Merge LoRA into the dequantized bf16 weights (changes precision; metrics record it)."""
    fold_lora: bool
    """Keep LoRA beside the dequantized weights in bf16, its add fused (rounds the adapter; excludes merge_bf16)."""
    bootstrap_resamples: int
    """Compare's paired bootstrap resamples for each delta's 95% interval (at least 10000)."""
    bootstrap_seed: int
    """The bootstrap's seed: the same predictions give the same intervals."""

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


def recorded_params(params: Any) -> dict[str, dict[str, Any]]:
    """The model, lora and train sections as plain values, for the adapter's card and the run's fingerprint, less
    the machine-only train keys. `params` is a Params or a stage's declared view of one."""
    sections = {"model": ModelParams, "lora": LoraParams, "train": TrainParams}
    return {name: {field.name: getattr(getattr(params, name), field.name) for field in dataclasses.fields(cls)
                   if not (name == "train" and field.name in MACHINE_ONLY_TRAIN_KEYS)}
            for name, cls in sections.items()}


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"params: {key} = {value!r} is invalid: expected {expected}.")


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
    kwargs = {name: coerce(value, hints[name], f"{section}.{name}") for name, value in values.items()}
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
