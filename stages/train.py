"""train: QLoRA fine-tuning of the base model on the format stage's ids and labels (loss on responses only).

Outs: models/adapter/ (adapter weights and config, the tokenizer with the training prompt as its chat template,
prompt_template.json, model card), metrics/train.json and the DVCLive curves in metrics/train_log/plots/ (with
train.dvclive false, a note saying there are none). Checkpoints go to models/checkpoints/<run fingerprint>/ (not a DVC
out): an interrupted run resumes from its last sound checkpoint on the next `dvc repro`, and reports the whole
run's metrics. One trainer at a time: the stage locks models/checkpoints/ and refuses while another run holds it.

With train.distributed = ddp | fsdp the stage re-executes itself under `accelerate launch` on
train.num_processes processes (the DVC command stays `python stages/train.py`); only process 0 writes outs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import _venv_check  # noqa: F401 (first: says to activate the venv when a package is missing)
import torch
from transformers import set_seed

from alpaca_qlora import io
from alpaca_qlora.adapter import render_model_card, save_adapter
from alpaca_qlora.config import recorded_params
from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.models.loading import load_tokenizer, resolve_model_source
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.stage import read_input_rows, run_stage, split_timing, timing_path
from alpaca_qlora.stage_params import stage_params
from alpaca_qlora.training.checkpoints import (
    lock_checkpoints,
    remove_stale_runs,
    run_fingerprint,
    share_lock_with_workers,
)
from alpaca_qlora.training.data import TokenizedDataset
from alpaca_qlora.training.distributed import accelerate_command, process_group
from alpaca_qlora.training.memory_budget import memory_budget, plan_to_budget, prefer_expandable_segments
from alpaca_qlora.training.model import build_trainable_model, resolve_speed_switches, targeted_modules
from alpaca_qlora.training.tracking import publish_curves
from alpaca_qlora.training.trainer import TrainingJob, run_training

TRAIN_IN = Path("data/formatted/train.jsonl")
DATA_SOURCE = Path("metrics/data.json")  # fetch's description of where the rows came from, for the model card
ADAPTER_OUT = Path("models/adapter")
CHECKPOINTS = Path("models/checkpoints")
METRICS_OUT = Path("metrics/train.json")
PLOTS_OUT = Path("metrics/train_log/plots")
ON_INTERRUPT = ("training resumes from its last checkpoint in models/checkpoints/ (train.resume: auto), so only the "
                "steps since it are run again")

log = logging.getLogger("train")


def main() -> None:
    prefer_expandable_segments()
    params = stage_params("train")
    recorded = recorded_params(params)
    lock = lock_checkpoints(CHECKPOINTS)  # held until this process (and the workers it launches) exits
    device = "cuda" if torch.cuda.is_available() else "cpu"
    command = accelerate_command(params.train, __file__, device)
    if command is not None:
        log.info("train.distributed=%s: %s", params.train.distributed, " ".join(command))
        share_lock_with_workers(lock, CHECKPOINTS)
        os.execv(command[0], command)
    ranks = process_group()
    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    plan = plan_quantization(params.model.quantization, device)
    log.info("device %s; %s (%s)", device, "4-bit NF4" if plan.quantized else "not quantized", plan.reason)

    source = resolve_model_source(params.model.name)
    tokenizer = load_tokenizer(source)
    set_seed(params.train.seed)  # LoRA initialisation and data order
    switches = resolve_speed_switches(params.train, device, params.lora)
    log.info("liger kernels %s, gradient checkpointing %s, fused LoRA %s", *("on" if switch else "off" for switch in (
        switches.liger_kernels, switches.gradient_checkpointing, switches.fused_lora)))
    model = build_trainable_model(source, plan, params.lora, switches, device=device,
                                  frozen_dtype=params.train.frozen_dtype,
                                  checkpoint_offload=params.train.checkpoint_offload,
                                  shardable=params.train.distributed == "fsdp")
    resolved_targets = targeted_modules(model)  # all-linear as PEFT resolved it, for metrics/train.json
    budget = memory_budget(params.train, device)
    memory_plan = plan_to_budget(model, budget, plan.compute_dtype) if budget is not None else None

    data_sha256 = io.sha256_file(TRAIN_IN)
    dataset = TokenizedDataset(read_input_rows(TRAIN_IN, "format"))
    run_dir = CHECKPOINTS / run_fingerprint(recorded, data_sha256)
    if ranks.is_main:
        remove_stale_runs(CHECKPOINTS, keep=run_dir)
    with tempfile.TemporaryDirectory(prefix="alpaca-qlora-curves-") as live_dir:  # the out is replaced at the end
        job = TrainingJob(model=model, tokenizer=tokenizer, dataset=dataset, train=params.train, plan=plan,
                          device=device, run_dir=run_dir, log_dir=Path(live_dir))
        result = run_training(job, resume=params.train.resume == "auto")
        if not ranks.is_main:
            return
        publish_curves(Path(live_dir), PLOTS_OUT, enabled=params.train.dvclive)
    metrics = {**result.metrics, **dataclasses.asdict(switches), **(memory_plan.record() if memory_plan else {}),
               "lora_target_modules_resolved": resolved_targets}
    if budget is not None:
        metrics["memory_plan_budget_gib"] = budget.gib
    publish(params, recorded, model, tokenizer, metrics, result.state_dict,
            training_data={"train_file": str(TRAIN_IN), "train_rows": len(dataset), "train_file_sha256": data_sha256})
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints only serve an interrupted run
    log.info("loss %.4f -> %.4f in %d steps, %.0f tokens/s; adapter in %s", metrics["first_loss"] or 0,
             metrics["final_loss"] or 0, metrics["steps"], metrics["tokens_per_s"], ADAPTER_OUT)


def publish(params: Any, recorded: dict[str, Any], model: Any, tokenizer: Any, metrics: dict[str, Any],
            state_dict: dict[str, Any] | None, *, training_data: dict[str, Any]) -> None:
    """The adapter with its card, the result metrics and the machine's timing: the card, inside the adapter out,
    gets no machine-dependent figure."""
    results, timing = split_timing(metrics)
    template = get_template(params.data.template)
    card = render_model_card(model_name=params.model.name, template=template, params=recorded, metrics=results,
                             data=io.read_json(DATA_SOURCE), training_data=training_data)
    save_adapter(model, tokenizer, ADAPTER_OUT, card, model_name=params.model.name, template=template,
                 state_dict=state_dict)
    io.write_json(timing_path("train"), timing)
    io.write_json(METRICS_OUT, results)


if __name__ == "__main__":
    run_stage(main, on_interrupt=ON_INTERRUPT)
