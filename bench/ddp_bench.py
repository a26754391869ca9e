"""DDP and FSDP on the 7B shape, through the project's training code path: tokens/s and memory per GPU.

Each process builds the train stage's model with the Mistral profile's settings as the stage resolves them
(bench.train_variants.project_settings: 4-bit NF4 base, bf16 frozen weights, gradient checkpointing offloaded, Liger,
LoRA; `--no-liger` measures what Liger is worth) and trains on its own micro-batches of ROWS x 2048 tokens.
`--mode ddp`: accelerate wraps the model in DDP, every process holds the whole base, and the LoRA gradients are
all-reduced. `--mode fsdp`: the train stage's FSDP2 settings (training.sharding, through the
FullyShardedDataParallelPlugin the Trainer would build, the output projection left whole as the stage leaves it):
one `fully_shard` unit per decoder layer, the NF4 weights stored in bf16-typed tensors and sharded.

The FSDP model is loaded as the stage loads it: staged in host memory, each decoder layer moved to the GPU by
`fully_shard` and cut to this process's shard, gradients reduced in fp32; `--offload` adds FSDP2's CPUOffloadPolicy
(train.fsdp_offload). Each process's peaks while loading and training, and its host memory, go to the JSON.

`--memory-cap-gib G` caps this process's CUDA allocator at G GiB (torch.cuda.set_per_process_memory_fraction), to
show what FSDP is for: a shape that does not fit one capped card under DDP, trained on two. Running out of memory is
a result here (`oom` in the JSON), not an error.

    accelerate launch --multi_gpu --num_processes 2 -m bench.ddp_bench MODEL_DIR --mode ddp --out OUT/ddp_2.json
    accelerate launch --multi_gpu --num_processes 2 -m bench.ddp_bench MODEL_DIR --mode fsdp --out OUT/fsdp_2.json
    python -m bench.ddp_bench --summarize OUT/ddp_2.json OUT/fsdp_2.json --out OUT/parallel.json

The summary prints a table and writes `scaling_efficiency` (DDP on N GPUs against N x one GPU, where a 1-process
DDP run is given) and `fsdp_over_ddp` (FSDP's tokens/s over DDP's at the same process count, uncapped runs).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.stage import configure_logging
from alpaca_qlora.training.memory_budget import cap_process_memory
from alpaca_qlora.training.packing import packed_attention
from alpaca_qlora.training.peak_memory import gpu_peak_gib, host_peak_gib, per_process
from alpaca_qlora.training.sharding import fsdp_training_arguments, keep_output_projection_whole, reduce_in_fp32
from bench import command_line
from bench.train_variants import project_model, project_settings
from bench.workloads import collate, dense_batches

log = logging.getLogger("ddp_bench")
LENGTH = 2048


def fsdp_plugin(offload: bool = False) -> Any:
    """The plugin the Trainer builds from the train stage's FSDP arguments (Trainer.create_accelerator...)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    with tempfile.TemporaryDirectory() as scratch:
        arguments = TrainingArguments(output_dir=scratch, report_to=[], **fsdp_training_arguments(offload))
    return FullyShardedDataParallelPlugin(**arguments.fsdp_plugin_args)


def build_model(model_dir: str, mode: str, liger: bool) -> Any:
    """The train stage's model with the Mistral profile's settings as the stage resolves them under `mode`
    (bench.train_bench's "project" variant), shardable for FSDP; `liger` False turns Liger's kernels off."""
    settings = {**project_settings(mode), **({} if liger else {"liger": False})}
    settings.pop("packing")  # the bench's rows are always packed bins
    model = project_model(model_dir, shardable=mode == "fsdp", **settings)
    packed_attention(model, "cuda")  # packed bins, as the train stage trains them
    return model


def measure(model_dir: str, mode: str, steps: int, warmup: int, rows: int, cap_gib: float | None,
            liger: bool = True, offload: bool = False) -> dict[str, Any]:
    from accelerate import Accelerator

    # bf16 as the Trainer runs it: autocast for DDP, and for FSDP2 the policy that computes in bf16.
    accelerator = Accelerator(mixed_precision="bf16", fsdp_plugin=fsdp_plugin(offload) if mode == "fsdp" else None)
    torch.cuda.set_device(accelerator.local_process_index)
    if cap_gib is not None:
        cap_process_memory(cap_gib, torch.device("cuda", accelerator.local_process_index))
    result: dict[str, Any] = {
        "mode": mode, "liger": liger, "offload": offload, "processes": accelerator.num_processes,
        "device": torch.cuda.get_device_name(0),
        "micro_batch": f"{rows}x{LENGTH} per process", "memory_cap_gib": cap_gib, "steps": steps, "oom": None,
        "is_main": accelerator.is_main_process,
    }
    losses: list[float] = []
    stage = "load"
    try:
        model = build_model(model_dir, mode, liger)
        if mode == "fsdp":
            keep_output_projection_whole(accelerator.state.fsdp_plugin, model, torch.bfloat16, accelerator.device)
            reduce_in_fp32(accelerator.state.fsdp_plugin, torch.bfloat16)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        stage = "prepare"
        model, optimizer = accelerator.prepare(model, optimizer)
        # loading and sharding: under DDP the whole base, under FSDP the shards plus the layer being cut
        result["load_peak_memory_gib_per_rank"] = per_process(gpu_peak_gib())
        result["load_peak_memory_gib"] = max(result["load_peak_memory_gib_per_rank"])
        batches, _ = collate(dense_batches(steps + warmup, rows=rows, length=LENGTH,
                                           seed=1000 + accelerator.process_index), True)
        model.train()
        started = 0.0
        for step, batch in enumerate(batches):
            stage = f"step {step}"
            if step == warmup:
                torch.cuda.synchronize()
                accelerator.wait_for_everyone()
                torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
        torch.cuda.synchronize()
        accelerator.wait_for_everyone()
    except torch.OutOfMemoryError as error:
        # Every process of a run reaches the same point with the same shapes, so none waits on a dead peer.
        result["oom"] = f"{stage}: {str(error).splitlines()[0]}"
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        log.warning("out of memory at %s (cap %s GiB)", stage, cap_gib)
        return result
    elapsed = time.perf_counter() - started
    tokens = accelerator.num_processes * rows * LENGTH * steps
    peaks = per_process(gpu_peak_gib())
    return {
        **result,
        "step_time_s": round(elapsed / steps, 4),
        "tokens_per_s": round(tokens / elapsed, 1),
        "peak_memory_gib": max(peaks),
        "peak_memory_gib_per_rank": peaks,
        "peak_reserved_gib_per_rank": per_process(torch.cuda.max_memory_reserved() / 2**30),
        "host_peak_gib_per_rank": per_process(host_peak_gib()),
        "losses_rank0": losses,
    }


def comparable(run: dict[str, Any]) -> bool:
    """An uncapped run with the project's settings: the runs ratios compare (a --no-liger run is reported only)."""
    return (not run.get("oom") and not run.get("memory_cap_gib") and run.get("liger", True)
            and not run.get("offload"))


def summarize(paths: list[Path]) -> dict[str, Any]:
    runs = [json.loads(path.read_text()) for path in paths]
    for run in runs:
        run.setdefault("mode", "ddp")  # runs from before FSDP was measured here
    measured = [run for run in runs if comparable(run)]
    speed = {(run["mode"], run["processes"]): run["tokens_per_s"] for run in measured}
    summary: dict[str, Any] = {"runs": runs}
    if ("ddp", 1) in speed:
        summary["scaling_efficiency"] = {str(n): round(tok_s / (n * speed[("ddp", 1)]), 3)
                                         for (mode, n), tok_s in speed.items() if mode == "ddp" and n > 1}
    summary["fsdp_over_ddp"] = {str(n): round(tok_s / speed[("ddp", n)], 3)
                                for (mode, n), tok_s in speed.items() if mode == "fsdp" and ("ddp", n) in speed}
    return summary


def cap_between(summary: dict[str, Any]) -> float:
    """A per-GPU cap halfway between FSDP's allocated peak (loading included) and DDP's in an uncapped summary: DDP
    cannot fit under it, and FSDP has the rest as the allocator's slack (a capped allocator frees its cache before
    it gives up). An error if no cap separates them."""
    runs = {run["mode"]: run for run in summary["runs"] if comparable(run)}
    if not {"ddp", "fsdp"} <= runs.keys():
        raise SystemExit("--cap-from needs an uncapped ddp run and an uncapped fsdp run in the summary")
    if "load_peak_memory_gib" not in runs["fsdp"]:
        raise SystemExit("--cap-from needs FSDP's peak while loading (load_peak_memory_gib): measure it again")
    fsdp_needs = max(runs["fsdp"]["peak_memory_gib"], runs["fsdp"]["load_peak_memory_gib"])
    ddp_needs = runs["ddp"]["peak_memory_gib"]
    if fsdp_needs >= ddp_needs:
        raise SystemExit(f"no cap separates them: FSDP allocated {fsdp_needs} GiB, DDP {ddp_needs} GiB")
    return round((fsdp_needs + ddp_needs) / 2, 2)


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'mode':>14} {'procs':>5} {'cap GiB':>8} {'step s':>8} {'tok/s':>9} {'peak GiB':>9}  result")
    for run in summary["runs"]:
        cap = f"{run['memory_cap_gib']:.2f}" if run.get("memory_cap_gib") else "-"
        mode = run["mode"] + ("" if run.get("liger", True) else " (no Liger)")
        mode += " offload" if run.get("offload") else ""
        if run.get("oom"):
            print(f"{mode:>14} {run['processes']:>5} {cap:>8} {'-':>8} {'-':>9} "
                  f"{run['peak_memory_gib']:>9.2f}  OOM at {run['oom'].split(':')[0]}")
            continue
        peak = run.get("peak_memory_gib", run.get("peak_memory_gib_rank0"))
        print(f"{mode:>14} {run['processes']:>5} {cap:>8} {run['step_time_s']:>8.3f} "
              f"{run['tokens_per_s']:>9.0f} {peak:>9.2f}  trained")
    for key in ("scaling_efficiency", "fsdp_over_ddp"):
        if summary.get(key):
            print(f"{key}: {summary[key]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=12, help="measured steps, after the warmup steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4, help=f"rows of {LENGTH} tokens per process per step")
    parser.add_argument("--no-liger", action="store_true", help="Liger's kernels off (what they are worth)")
    parser.add_argument("--offload", action="store_true", help="FSDP2's CPUOffloadPolicy (train.fsdp_offload)")
    parser.add_argument("--memory-cap-gib", type=float, help="cap each process's CUDA allocator at this many GiB")
    parser.add_argument("--cap-from", type=Path, help="print cap_between() of this summary's runs, and exit")
    parser.add_argument("--summarize", nargs="+", type=Path, help="combine the per-run JSON files")
    arguments = parser.parse_args()
    configure_logging()
    if arguments.cap_from:
        print(cap_between(json.loads(arguments.cap_from.read_text())))
        return
    if arguments.summarize:
        summary = {"command": command_line(), **summarize(arguments.summarize)}
        arguments.out.write_text(json.dumps(summary, indent=2) + "\n")
        print_table(summary)
        return
    if not arguments.model_dir:
        parser.error("model_dir is required unless --summarize is given")
    result = measure(arguments.model_dir, arguments.mode, arguments.steps, arguments.warmup, arguments.rows,
                     arguments.memory_cap_gib, liger=not arguments.no_liger, offload=arguments.offload)
    if result.pop("is_main"):
        result["command"] = command_line()
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        arguments.out.write_text(json.dumps(result, indent=2) + "\n")
        log.info("%s", {key: value for key, value in result.items() if key != "losses_rank0"})


if __name__ == "__main__":
    main()
