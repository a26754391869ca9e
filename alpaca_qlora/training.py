"""QLoRA training on the format stage's token ids and labels, through the Hugging Face Trainer.

The Trainer is given the format stage's `input_ids` and `labels` untouched: no re-tokenizing, re-templating or
re-masking happens here, so what the loss sees is exactly what `data/formatted/train.jsonl` says. The Trainer
normalizes the loss by the number of labelled tokens across all micro-batches of an optimizer step
(`num_items_in_batch`), so gradient accumulation gives the gradient of one big batch (tests check it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from alpaca_qlora import io
from alpaca_qlora.checkpoints import (
    HistoryCheckpointer,
    carried_counters,
    logged_losses,
    mean_step_loss,
    resumable_checkpoint,
)
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.formatting import IGNORE_INDEX
from alpaca_qlora.models.loading import load_model
from alpaca_qlora.models.quantization import QuantizationPlan
from alpaca_qlora.packing import (
    PackedCollator,
    PackedDataset,
    packed_padding,
    use_varlen_attention,
    varlen_attention_available,
)

log = logging.getLogger(__name__)


class TokenizedDataset(torch.utils.data.Dataset):
    """The format stage's rows, as the Trainer's dataset; rows are served exactly as stored."""

    def __init__(self, rows: Sequence[dict[str, Any]]):
        for row in rows:
            if len(row["input_ids"]) != len(row["labels"]):
                raise PipelineError(f"row {row.get('id')}: input_ids and labels differ in length; rerun format.")
            if all(label == IGNORE_INDEX for label in row["labels"]):
                raise PipelineError(f"row {row.get('id')}: no labelled token; rerun format.")
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


@dataclass
class TokenCounts:
    """Tokens that went through the model (padding excluded).

    Counted as batches enter the model (a forward pre-hook), not where they are collated: the Trainer collates
    ahead of use, and batches collated after the last step would otherwise count.
    """

    tokens: int = 0
    labelled: int = 0
    padded: int = 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
        if input_ids is None or labels is None or not module.training:
            return
        mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None:
            real = int(mask.sum())
        elif position_ids is not None:
            real = input_ids.numel() - packed_padding(labels, position_ids)
        else:
            real = input_ids.numel()
        self.tokens += real
        self.labelled += int((labels != IGNORE_INDEX).sum())
        self.padded += input_ids.numel() - real

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(self.tokens + other.tokens, self.labelled + other.labelled, self.padded + other.padded)


@dataclass
class ResponseOnlyCollator:
    """Right-pads a micro-batch: padding gets attention 0 and label IGNORE_INDEX, whatever the pad token's id is.

    Masking padding by position (not by comparing ids to the pad id) keeps EOS labels even when pad == EOS.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_collator(packing: bool, pad_token_id: int) -> ResponseOnlyCollator | PackedCollator:
    return PackedCollator(pad_token_id=pad_token_id) if packing else ResponseOnlyCollator(pad_token_id=pad_token_id)


def training_items(job: TrainingJob) -> torch.utils.data.Dataset:
    """What the Trainer samples: rows, or with packing the bins they were packed into (micro_batch_size counts
    bins then)."""
    if job.train.packing:
        return PackedDataset(job.dataset.rows, job.train.max_seq_length, job.train.seed)
    return job.dataset


@dataclass(frozen=True)
class SpeedSwitches:
    liger_kernels: bool
    gradient_checkpointing: bool


def resolve_speed_switches(train: Any, device: str, *, liger_installed: bool | None = None) -> SpeedSwitches:
    """`auto` turns Liger kernels and gradient checkpointing on for CUDA, where bench/train_bench.py measured them
    paying (with packing and bf16 frozen weights: 1.56x the tokens/s of the HF+PEFT baseline at 0.66x its peak
    memory on an H200), and off on CPU, where a small model needs no checkpointing and Triton does not run.
    Liger on auto also needs liger-kernel installed; without it training goes on unfused, with a warning."""
    on_cuda = device == "cuda"
    checkpointing = on_cuda if train.gradient_checkpointing == "auto" else bool(train.gradient_checkpointing)
    liger = bool(train.liger_kernels)
    if train.liger_kernels == "auto":
        if liger_installed is None:
            liger_installed = importlib.util.find_spec("liger_kernel") is not None
        liger = on_cuda and liger_installed
        if on_cuda and not liger_installed:
            log.warning("train.liger_kernels=auto: liger-kernel is not installed, so training runs without its fused "
                        "kernels (pip install liger-kernel: faster, and less memory)")
    if train.checkpoint_offload and not checkpointing:
        raise PipelineError("train.checkpoint_offload=true moves gradient checkpoints to host memory, but gradient "
                            f"checkpointing is off on {device} (train.gradient_checkpointing="
                            f"{train.gradient_checkpointing}); set train.gradient_checkpointing=true.")
    return SpeedSwitches(liger_kernels=liger, gradient_checkpointing=checkpointing)


def apply_liger_kernels(model: torch.nn.Module, device: str) -> None:
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) patched into the base model.

    The fused cross-entropy never materializes the (tokens x vocabulary) logits, the largest activation of a
    7B model's training step. CUDA only: asked for elsewhere it is an error, never a silent no-op.
    """
    if device != "cuda":
        raise PipelineError("train.liger_kernels=true needs a CUDA GPU (Triton kernels); set it to false here.")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as error:
        raise PipelineError(f"train.liger_kernels=true but liger-kernel is not importable ({error}).") from error
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)


def validate_target_modules(model: torch.nn.Module, target_modules: Sequence[str]) -> None:
    """Every requested LoRA target must exist, or a typo would silently train fewer modules."""
    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")}
    missing = [name for name in target_modules if name not in linear_names]
    if missing:
        raise PipelineError(
            f"lora.target_modules {missing} do not exist in this model; its linear layers are: "
            f"{', '.join(sorted(linear_names))}."
        )


def prepare_quantized_model(model: torch.nn.Module, *, gradient_checkpointing: bool, frozen_dtype: str) -> Any:
    """Freeze the base and make its inputs carry gradients, as QLoRA needs.

    frozen_dtype="fp32" is PEFT's `prepare_model_for_kbit_training`: it upcasts every frozen non-4-bit weight
    (embeddings, norms, lm_head) to fp32, which makes the residual stream fp32 and doubles the checkpointed
    activations. "compute" keeps them in the compute dtype (what Unsloth does): less memory, bf16 residuals.
    """
    if frozen_dtype == "fp32":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing per decoder layer; the embeddings' output must carry gradients for it."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


class OffloadedCheckpoint(torch.autograd.Function):
    """Activation checkpointing whose saved layer input waits in pinned host memory instead of on the GPU.

    Forward runs the layer without keeping its graph and copies the layer's input to the host; backward copies it
    back, recomputes the layer with the same RNG state and autocast settings (so LoRA dropout masks match), and
    backpropagates through the recomputation. The GPU keeps no per-layer activation between forward and backward.
    """

    @staticmethod
    def forward(ctx: Any, run: Any, hidden_states: torch.Tensor, *args: Any) -> Any:
        device = hidden_states.device
        ctx.run, ctx.args, ctx.device = run, args, device
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        host = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device="cpu",
                           pin_memory=device.type == "cuda")
        host.copy_(hidden_states.detach(), non_blocking=True)
        ctx.host = host
        with torch.no_grad():
            return run(hidden_states, *args)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        hidden_states = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.host = None
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, ctx.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                outputs = ctx.run(hidden_states, *ctx.args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs)
                 if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, hidden_states.grad, *([None] * len(ctx.args)))


def offloaded_checkpoint(run: Any, hidden_states: torch.Tensor, *args: Any) -> Any:
    return OffloadedCheckpoint.apply(run, hidden_states, *args)


def enable_checkpoint_offload(model: torch.nn.Module) -> int:
    """Swap the checkpoint function of every checkpointed decoder layer for the host-offloading one."""
    layers = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            if type(module).__name__.endswith(("DecoderLayer", "Block")):
                module._gradient_checkpointing_func = offloaded_checkpoint
                layers += 1
    if layers == 0:
        raise PipelineError("train.checkpoint_offload=true found no checkpointed decoder layer in this model.")
    return layers


def attach_lora(model: torch.nn.Module, lora: Any, *, quantized: bool, gradient_checkpointing: bool,
                frozen_dtype: str = "compute", checkpoint_offload: bool = False) -> Any:
    from peft import LoraConfig, get_peft_model

    validate_target_modules(model, lora.target_modules)
    if quantized:
        model = prepare_quantized_model(model, gradient_checkpointing=gradient_checkpointing,
                                        frozen_dtype=frozen_dtype)
    elif gradient_checkpointing:
        enable_checkpointing(model)
    if checkpoint_offload:
        log.info("checkpoint offload: %d decoder layers keep their checkpoints in host memory",
                 enable_checkpoint_offload(model))
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def build_trainable_model(source: str, plan: QuantizationPlan, lora: Any, switches: SpeedSwitches, *, device: str,
                          frozen_dtype: str = "compute", checkpoint_offload: bool = False,
                          shardable: bool = False) -> Any:
    """The train stage's model, built in one place so the bench measures the stage's own sequence: the base as the
    plan says, Liger's kernels patched in before PEFT wraps the modules, then LoRA (and checkpointing) attached."""
    model = load_model(source, plan, device=device, shardable=shardable)
    if switches.liger_kernels:
        apply_liger_kernels(model, device)
    model = attach_lora(model, lora, quantized=plan.quantized, gradient_checkpointing=switches.gradient_checkpointing,
                        frozen_dtype=frozen_dtype, checkpoint_offload=checkpoint_offload)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable params: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)
    return model


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in a distributed run (torchrun / `accelerate launch` set these variables)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group() -> ProcessGroup:
    return ProcessGroup(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                        world_size=int(os.environ.get("WORLD_SIZE", 1)))


def accelerate_command(train: Any, script: str, device: str) -> list[str] | None:
    """The `accelerate launch` command that reruns `script` on train.num_processes processes.

    None when no launch is needed: train.distributed is none, or this process was already started by a launcher.
    The DVC stage's command stays `python stages/train.py`; the stage re-executes itself under accelerate.
    """
    if train.distributed == "none" or "LOCAL_RANK" in os.environ:
        return None
    if train.distributed == "fsdp" and device != "cuda":
        raise PipelineError("train.distributed=fsdp needs CUDA GPUs; use ddp (gloo) on CPU, or none.")
    if device == "cuda" and torch.cuda.device_count() < train.num_processes:
        raise PipelineError(f"train.num_processes={train.num_processes} but this machine has "
                            f"{torch.cuda.device_count()} GPU(s); lower it or use a machine with more GPUs.")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
               "--num_processes", str(train.num_processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if train.distributed == "fsdp":
        # FSDP + QLoRA as accelerate and PEFT document it: the 4-bit weights are stored as bf16-typed tensors so
        # FSDP can flatten and shard them with the rest (see models.bnb_config's quant_storage).
        command += ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD",
                    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "FULL_STATE_DICT",
                    "--fsdp_cpu_ram_efficient_loading", "true", "--fsdp_sync_module_states", "true",
                    "--fsdp_use_orig_params", "false", "--fsdp_offload_params", "false"]
    elif train.num_processes > 1:
        command += ["--multi_gpu"]  # torchrun under the hood: gloo on CPU, NCCL on GPUs
    return command + [script]


def all_reduce_counts(counts: TokenCounts) -> TokenCounts:
    """Tokens seen by all processes together (each process counts only its own micro-batches)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return counts
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only, gloo CPU tensors
    totals = torch.tensor([counts.tokens, counts.labelled, counts.padded], dtype=torch.long,
                          device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    torch.distributed.all_reduce(totals)
    tokens, labelled, padded = (int(value) for value in totals.tolist())
    return TokenCounts(tokens=tokens, labelled=labelled, padded=padded)


def trainer_precision(precision: str, device: str) -> dict[str, bool]:
    """Mixed-precision flags for TrainingArguments; 'auto' means bf16 on GPUs that have it, fp16 on others, fp32 on CPU."""
    if precision == "auto":
        if device != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device != "cuda":
        raise PipelineError("train.precision=fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU.")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def optimizer_steps(num_rows: int, train: Any, world_size: int = 1) -> int:
    if train.max_steps > 0:
        return train.max_steps
    per_epoch = math.ceil(num_rows / (train.micro_batch_size * world_size * train.gradient_accumulation_steps))
    return max(1, math.ceil(per_epoch * train.epochs))


def run_fingerprint(params: dict[str, Any], data_sha256: str) -> str:
    """Checkpoints are reused only by a run with the same params and the same training data."""
    payload = json.dumps({"params": params, "data": data_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


WANDB_DEFAULT_URL = "https://api.wandb.ai"  # wandb's default base_url
WANDB_PROBE_TIMEOUT_S = 5.0


def wandb_unreachable(base_url: str, timeout_s: float = WANDB_PROBE_TIMEOUT_S) -> str | None:
    """Why the W&B server can't be reached, or None if a connection opens.

    Without network W&B itself retries until its init timeout and then stops the training run with a CommError;
    a connection attempt answers at once or within the probe timeout.
    """
    import socket
    import urllib.parse

    parsed = urllib.parse.urlsplit(base_url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as error:
        return f"{type(error).__name__}: {error}"


def wandb_environment(project: str) -> dict[str, str]:
    """W&B settings that never block: offline unless the user configured a key (env or `wandb login`) and the
    server answers."""
    env = {"WANDB_PROJECT": project}
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    if "WANDB_MODE" in os.environ:
        return env
    if not logged_in:
        env["WANDB_MODE"] = "offline"
        return env
    base_url = os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_URL)
    problem = wandb_unreachable(base_url)
    if problem is not None:
        log.warning("W&B server %s is unreachable (%s): logging offline to ./wandb instead. Upload the run later "
                    "with `wandb sync --sync-all` (or `wandb sync wandb/offline-run-<id>`).", base_url, problem)
        env["WANDB_MODE"] = "offline"
    return env


class ThroughputProgress(TrainerCallback):
    """A tqdm bar over optimizer steps showing loss and non-pad tokens/s (ETA comes with tqdm)."""

    def __init__(self, counts: TokenCounts):
        self.counts = counts
        self.bar: tqdm | None = None
        self.started = 0.0
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self.started, self.tokens_at_start = time.perf_counter(), self.counts.tokens

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix(tok_s=f"{(self.counts.tokens - self.tokens_at_start) / elapsed:.0f}", refresh=False)
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
            log.info("step %d: %s", state.global_step, {k: round(v, 6) if isinstance(v, float) else v
                                                       for k, v in logs.items()})

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class LossLogger(TrainerCallback):
    """With DVCLive, writes loss and learning-rate curves for `dvc plots`.

    A resumed run first replays the log its checkpoint carries: DVC removed the old curves before rerunning the
    stage, and those may run past the checkpoint anyway (DVCLive's own `resume=True` would continue them, steps
    after the checkpoint twice).
    """

    def __init__(self, directory: Path | None):
        self.live = None
        if directory is not None and process_group().is_main:
            from dvclive import Live

            self.live = Live(dir=str(directory), save_dvc_exp=False, dvcyaml=None, report=None)

    def on_train_begin(self, args, state, control, **kwargs):
        for entry in state.log_history:
            if "loss" in entry:
                self.write(int(entry["step"]), entry)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self.write(state.global_step, logs)

    def write(self, step: int, logs: dict[str, Any]) -> None:
        if self.live is None:
            return
        self.live.step = step
        self.live.log_metric("train/loss", float(logs["loss"]))
        if "learning_rate" in logs:
            self.live.log_metric("train/learning_rate", float(logs["learning_rate"]))
        if "grad_norm" in logs:
            self.live.log_metric("train/grad_norm", float(logs["grad_norm"]))
        self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def peak_memory(device: str) -> dict[str, Any]:
    if device == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_memory_kind": "cuda_max_allocated"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_gib": round(rss_kib / 2**20, 3), "peak_memory_kind": "process_max_rss"}


@dataclass(frozen=True)
class TrainingJob:
    """Everything one training run needs, resolved by the stage script."""

    model: Any  # a PeftModel
    tokenizer: Any
    dataset: TokenizedDataset
    train: Any  # TrainParams (or the stage's view of them)
    plan: QuantizationPlan
    device: str
    run_dir: Path
    log_dir: Path
    extra_callbacks: tuple[TrainerCallback, ...] = ()
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # run_training's products besides metrics


def build_training_arguments(job: TrainingJob, items: int | None = None) -> TrainingArguments:
    """`items`: how many rows, or with packing bins, an epoch samples (the dataset's rows by default)."""
    train = job.train
    world_size = process_group().world_size
    total_steps = optimizer_steps(len(job.dataset) if items is None else items, train, world_size=world_size)
    report_to = ["wandb"] if train.wandb else []
    distributed: dict[str, Any] = {}
    if world_size > 1:
        # Every LoRA weight gets a gradient each step; searching for unused ones would cost a graph walk.
        distributed = {"ddp_find_unused_parameters": False, "ddp_backend": "nccl" if job.device == "cuda" else "gloo"}
    arguments = TrainingArguments(
        output_dir=str(job.run_dir),
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=int(math.ceil(train.warmup_ratio * total_steps)),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        seed=train.seed,
        data_seed=train.seed,
        report_to=report_to,
        run_name=f"{job.run_dir.name}",
        remove_unused_columns=False,
        use_cpu=job.device != "cuda",
        dataloader_num_workers=0,
        disable_tqdm=False,
        optim="adamw_torch",
        **distributed,
        **trainer_precision(train.precision, job.device),
    )
    # One process trains on one GPU. With several GPUs visible and no launcher the Trainer wraps the model in
    # nn.DataParallel: on a 2-GPU machine a single-process run logged loss 22.3 where DDP on the same data logged
    # 11.1. More GPUs are used through train.distributed, never implicitly.
    _ = arguments.device
    arguments._n_gpu = min(arguments._n_gpu, 1)
    return arguments


def run_training(job: TrainingJob, *, resume: bool) -> dict[str, Any]:
    """Train, resuming from the run's last sound checkpoint if asked and one exists; returns the run's measurements.

    A resumed run's measurements are the whole run's (losses from the log the checkpoint carries, token counts
    from its run_history.json), except throughput and runtime, which are this call's.
    """
    collator = make_collator(job.train.packing, job.tokenizer.pad_token_id)
    items = training_items(job)
    job.model.config.use_cache = False  # a KV cache is useless in training and hides packed-row boundaries
    # Packed bins on CUDA: a variable-length flash kernel, instead of sdpa under a materialized block mask.
    attention = job.model.config._attn_implementation
    if job.train.packing and varlen_attention_available(job.device):
        use_varlen_attention(job.model)
        attention = "varlen"
    ranks = process_group()
    checkpoint = resumable_checkpoint(job.run_dir, ranks.world_size, is_main=ranks.is_main) if resume else None
    # Process 0 carries the counts up to the checkpoint; the others add only what they see from here.
    carried = TokenCounts(**carried_counters(checkpoint)) if ranks.is_main else TokenCounts()
    local_counts = TokenCounts()
    counting = job.model.register_forward_pre_hook(local_counts, with_kwargs=True)
    progress = ThroughputProgress(local_counts)
    losses = LossLogger(job.log_dir if job.train.dvclive else None)
    history = HistoryCheckpointer(lambda: dataclasses.asdict(carried + all_reduce_counts(local_counts)))
    if job.train.wandb:
        os.environ.update(wandb_environment(job.train.wandb_project))
    trainer = Trainer(
        model=job.model,
        args=build_training_arguments(job, len(items)),
        train_dataset=items,
        data_collator=collator,
        processing_class=job.tokenizer,
        callbacks=[progress, losses, history, *job.extra_callbacks],
    )
    trainer.remove_callback(ProgressCallback)
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    if job.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        losses.close()
        counting.remove()
    runtime = time.perf_counter() - started
    if trainer.is_fsdp_enabled:
        # Sharded weights: every process takes part in gathering the full state dict (process 0 receives it);
        # a save from process 0 alone would wait forever for the others.
        job.outputs["state_dict"] = trainer.accelerator.get_state_dict(trainer.model)
    this_call = all_reduce_counts(local_counts)
    counts = carried + this_call
    trainable, total = job.model.get_nb_trainable_parameters()
    loss_curve = logged_losses(trainer.state.log_history)
    last_losses = [loss for _, loss in loss_curve[-3:]]
    train_loss = mean_step_loss(trainer.state.log_history)
    return {
        "train_loss": round(train_loss, 6) if train_loss is not None else round(float(result.training_loss), 6),
        "final_loss": round(sum(last_losses) / len(last_losses), 6) if last_losses else None,
        "first_loss": round(loss_curve[0][1], 6) if loss_curve else None,
        "steps": int(trainer.state.global_step),
        "resumed_from_step": int(checkpoint.name.split("-")[-1]) if checkpoint else 0,
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "runtime_s": round(runtime, 2),
        "tokens": counts.tokens,
        "labelled_tokens": counts.labelled,
        "tokens_per_s": round(this_call.tokens / runtime, 2),
        "labelled_tokens_per_s": round(this_call.labelled / runtime, 2),
        "padding_fraction": round(counts.padded / max(1, counts.padded + counts.tokens), 4),
        "attention": attention,
        "processes": ranks.world_size,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_percent": round(100 * trainable / total, 4),
        "quantized": job.plan.quantized,
        "quantization_reason": job.plan.reason,
        "compute_dtype": str(job.plan.compute_dtype).removeprefix("torch."),
        "device": job.device,
        **peak_memory(job.device),
    }


def render_model_card(*, base_model: str, template: str, params: dict[str, Any], metrics: dict[str, Any],
                      data: dict[str, Any]) -> str:
    """The adapter's README: enough to know what it is, how it was made and how to use it."""
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: peft",
        "tags: [qlora, lora, alpaca, instruction-tuning]",
        "---",
        "",
        f"# LoRA adapter for {base_model}",
        "",
        "Trained by the alpaca-qlora DVC pipeline (`dvc repro`): instruction tuning with the loss on response "
        "tokens only.",
        "",
        "## Use",
        "",
        "```bash",
        'python -m alpaca_qlora.infer "Name the chemical symbol of sodium."',
        "```",
        "",
        f"Prompt template: `{template}` (see `alpaca_qlora/prompts.py`); the base model is loaded as in training "
        f"({'4-bit NF4' if metrics.get('quantized') else 'unquantized'}) and the adapter attached at runtime.",
        "",
        "## Data",
        "",
        *[f"- {key}: {value}" for key, value in sorted(data.items())],
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(params, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Training metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {key} | {value} |" for key, value in sorted(metrics.items())],
        "",
    ]
    return "\n".join(lines)


def save_adapter(model: Any, tokenizer: Any, out_dir: Path, model_card: str, *, base_model: str | None = None,
                 state_dict: dict[str, Any] | None = None) -> None:
    """Adapter weights, config, tokenizer and card, swapped into place only when complete.

    `base_model` (the `model.name` param) replaces the resolved local path in adapter_config.json, so the adapter
    names the model it belongs to (a hub id, or the embedded name) rather than a cache directory of this machine.
    """
    if base_model is not None:
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_model
    with io.atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card, encoding="utf-8")


def remove_stale_runs(checkpoint_root: Path, keep: Path | None = None) -> None:
    if not checkpoint_root.is_dir():
        return
    for run_dir in checkpoint_root.iterdir():
        if run_dir != keep and run_dir.is_dir():  # the root's lock file stays
            shutil.rmtree(run_dir, ignore_errors=True)


def params_as_dict(view: Any, fields: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(view, name) for name in fields}


def dataclass_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
