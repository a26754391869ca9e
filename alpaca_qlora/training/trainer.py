"""QLoRA training on the format stage's token ids and labels, through the Hugging Face Trainer.

The Trainer is given the format stage's `input_ids` and `labels` untouched: no re-tokenizing, re-templating or
re-masking happens here, so what the loss sees is exactly what `data/formatted/train.jsonl` says. The Trainer
normalizes the loss by the number of labelled tokens across all micro-batches of an optimizer step
(`num_items_in_batch`), so gradient accumulation gives the gradient of one big batch (tests check it).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.quantization import QuantizationPlan
from alpaca_qlora.training.checkpoints import (
    HistoryCheckpointer,
    carried_counters,
    logged_losses,
    mean_step_loss,
    resumable_checkpoint,
)
from alpaca_qlora.training.data import TokenCounts, TokenizedDataset, make_collator, training_items
from alpaca_qlora.training.distributed import all_reduce_counts, process_group
from alpaca_qlora.training.packing import packed_attention
from alpaca_qlora.training.peak_memory import LoadingPeak, peak_memory
from alpaca_qlora.training.sharding import (
    fsdp_training_arguments,
    gather_trainable_state_dict,
    is_sharded,
    keep_output_projection_whole,
    reduce_in_fp32,
)
from alpaca_qlora.training.tracking import LossLogger, wandb_environment

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TrainingResult:
    metrics: dict[str, Any]
    # FSDP only: the gathered trainable weights (on process 0), since the sharded model cannot save itself.
    state_dict: dict[str, Any] | None = None


def trainer_precision(precision: str, device: str) -> dict[str, bool]:
    """Mixed-precision flags for TrainingArguments; 'auto': bf16 on GPUs that have it, fp16 on others, fp32 on CPU."""
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
        if train.distributed == "fsdp":
            distributed.update(fsdp_training_arguments(offload=train.fsdp_offload))
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
    # One process trains on one GPU. With several GPUs visible and no launcher the Trainer would wrap the model
    # in nn.DataParallel, whose loss is not DDP's on the same data. More GPUs are used through
    # train.distributed, never implicitly.
    _ = arguments.device
    arguments._n_gpu = min(arguments._n_gpu, 1)
    return arguments


def _attention(job: TrainingJob) -> str:
    """The attention the run uses (packing.packed_attention for packed bins)."""
    job.model.config.use_cache = False  # a KV cache is useless in training and hides packed-row boundaries
    return packed_attention(job.model, job.device) if job.train.packing else job.model.config._attn_implementation


def _trainer(job: TrainingJob, items: Any, callbacks: list[Any], world_size: int) -> Trainer:
    """The Hugging Face Trainer over the format stage's items, with the sharding the launch asked for."""
    trainer = Trainer(
        model=job.model,
        args=build_training_arguments(job, len(items)),
        train_dataset=items,
        data_collator=make_collator(job.train.packing, job.tokenizer.pad_token_id),
        processing_class=job.tokenizer,
        callbacks=[*callbacks, *job.extra_callbacks],
    )
    trainer.remove_callback(ProgressCallback)
    if job.train.distributed == "fsdp" and world_size > 1 and not trainer.is_fsdp_enabled:
        raise PipelineError("train.distributed=fsdp, but accelerate did not enable FSDP for this process group "
                            f"({trainer.accelerator.distributed_type}); it does so on GPUs only. Use ddp here.")
    if trainer.is_fsdp_enabled:
        compute_dtype = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None
        plugin = trainer.accelerator.state.fsdp_plugin
        keep_output_projection_whole(plugin, job.model, compute_dtype, trainer.accelerator.device)
        reduce_in_fp32(plugin, compute_dtype)
    return trainer


def run_training(job: TrainingJob, *, resume: bool) -> TrainingResult:
    """Train, resuming from the run's last sound checkpoint if asked and one exists; returns the run's measurements.

    A resumed run's measurements are the whole run's (losses from the log the checkpoint carries, token counts
    from its run_history.json), except throughput and runtime, which are this call's.
    """
    items = training_items(job.dataset, job.train)
    attention = _attention(job)
    ranks = process_group()
    checkpoint = resumable_checkpoint(job.run_dir, ranks.world_size, is_main=ranks.is_main) if resume else None
    # Process 0 carries the counts up to the checkpoint; the others add only what they see from here.
    carried = TokenCounts(**carried_counters(checkpoint)) if ranks.is_main else TokenCounts()
    local_counts = TokenCounts()
    counting = job.model.register_forward_pre_hook(local_counts, with_kwargs=True)
    losses = LossLogger(job.log_dir if job.train.dvclive else None)
    history = HistoryCheckpointer(lambda: dataclasses.asdict(carried + all_reduce_counts(local_counts)))
    if job.train.wandb:
        os.environ.update(wandb_environment(job.train.wandb_project))
    loading = LoadingPeak(job.device)  # FSDP shards inside train(): its peak until then is the loading's
    trainer = _trainer(job, items, [ThroughputProgress(local_counts), losses, history, loading], ranks.world_size)
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    # Counted before train() prepares the model: under FSDP the parameters become one process's shards.
    trainable, total = job.model.get_nb_trainable_parameters()
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        losses.close()
        counting.remove()
    runtime = time.perf_counter() - started
    # Sharded weights: every process takes part in gathering the adapter (process 0 receives it); a save from
    # process 0 alone would wait forever for the others.
    sharded = is_sharded(trainer.model)
    state_dict = gather_trainable_state_dict(trainer.model) if sharded else None
    this_call = all_reduce_counts(local_counts)
    metrics = {
        **_loss_metrics(trainer.state, result),
        "resumed_from_step": int(checkpoint.name.split("-")[-1]) if checkpoint else 0,
        "runtime_s": round(runtime, 2),
        **_token_metrics(carried + this_call, this_call, runtime),
        "attention": attention,
        "processes": ranks.world_size,
        "sharded": sharded,  # FSDP: each process held 1/processes of the model
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_percent": round(100 * trainable / total, 4),
        "quantized": job.plan.quantized,
        "quantization_reason": job.plan.reason,
        "compute_dtype": str(job.plan.compute_dtype).removeprefix("torch."),
        "device": job.device,
        **peak_memory(job.device, loading),
    }
    return TrainingResult(metrics=metrics, state_dict=state_dict)


def _loss_metrics(state: Any, result: Any) -> dict[str, Any]:
    """The losses and progress a run reports, from the Trainer's log (whole-run, also when resumed)."""
    loss_curve = logged_losses(state.log_history)
    last_losses = [loss for _, loss in loss_curve[-3:]]
    train_loss = mean_step_loss(state.log_history)
    return {
        "train_loss": round(train_loss, 6) if train_loss is not None else round(float(result.training_loss), 6),
        "final_loss": round(sum(last_losses) / len(last_losses), 6) if last_losses else None,
        "first_loss": round(loss_curve[0][1], 6) if loss_curve else None,
        "steps": int(state.global_step),
        "epochs": round(float(state.epoch or 0), 4),
    }


def _token_metrics(counts: TokenCounts, this_call: TokenCounts, runtime: float) -> dict[str, Any]:
    """Whole-run token counts; throughput from this call's tokens and time."""
    return {
        "tokens": counts.tokens,
        "labelled_tokens": counts.labelled,
        "tokens_per_s": round(this_call.tokens / runtime, 2),
        "labelled_tokens_per_s": round(this_call.labelled / runtime, 2),
        "padding_fraction": round(counts.padded / max(1, counts.padded + counts.tokens), 4),
    }
