"""DDP scaling of the project's training code path on the 7B shape: tokens/s on N GPUs against N x one GPU.

Each process holds the 4-bit base and its LoRA replica (the train stage's code path and GPU defaults: Liger,
packing, bf16 frozen weights, gradient checkpointing); accelerate wraps the model in DDP, which all-reduces the
LoRA gradients every step. Every process trains on its own micro-batches of 4 x 2048 tokens.

    accelerate launch --num_processes 1 -m bench.ddp_bench MODEL_DIR --out OUT/ddp_1.json
    accelerate launch --multi_gpu --num_processes 2 -m bench.ddp_bench MODEL_DIR --out OUT/ddp_2.json
    python -m bench.ddp_bench --summarize OUT/ddp_1.json OUT/ddp_2.json --out OUT/ddp_scaling.json

The summary prints a table last and writes `scaling_efficiency` = tokens/s(N) / (N x tokens/s(1)).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.stage import configure_logging
from bench.train_bench import build_variant, collate, dense_batches

log = logging.getLogger("ddp_bench")


def measure_ddp(model_dir: str, steps: int, warmup: int, rows: int) -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator()
    torch.cuda.set_device(accelerator.local_process_index)
    model, packing = build_variant(model_dir, "project")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches, _ = collate(dense_batches(steps + warmup, rows=rows, length=2048,
                                       seed=1000 + accelerator.process_index), packing)
    model.train()
    losses: list[float] = []
    started = 0.0
    for step, batch in enumerate(batches):
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
    elapsed = time.perf_counter() - started
    processes = accelerator.num_processes
    tokens = processes * rows * 2048 * steps
    return {
        "processes": processes,
        "device": torch.cuda.get_device_name(0),
        "micro_batch": f"{rows}x2048 per process",
        "steps": steps,
        "step_time_s": round(elapsed / steps, 4),
        "tokens_per_s": round(tokens / elapsed, 1),
        "peak_memory_gib_rank0": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "losses_rank0": losses,
        "is_main": accelerator.is_main_process,
    }


def summarize(paths: list[Path]) -> dict[str, Any]:
    runs = sorted((json.loads(path.read_text()) for path in paths), key=lambda run: run["processes"])
    single = next(run for run in runs if run["processes"] == 1)
    scaling = {str(run["processes"]): round(run["tokens_per_s"] / (run["processes"] * single["tokens_per_s"]), 3)
               for run in runs if run["processes"] > 1}
    return {"scaling_efficiency": scaling, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4, help="rows of 2048 tokens per process per step")
    parser.add_argument("--summarize", nargs="+", type=Path, help="combine the per-N JSON files")
    arguments = parser.parse_args()
    configure_logging()
    if arguments.summarize:
        summary = {"command": " ".join(sys.argv), **summarize(arguments.summarize)}
        arguments.out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{'processes':>9} {'step s':>8} {'tok/s':>9} {'peak GiB':>9}")
        for run in summary["runs"]:
            print(f"{run['processes']:>9} {run['step_time_s']:>8.3f} {run['tokens_per_s']:>9.0f} "
                  f"{run['peak_memory_gib_rank0']:>9.2f}")
        print(f"scaling_efficiency: {summary['scaling_efficiency']}")
        return
    if not arguments.model_dir:
        parser.error("model_dir is required unless --summarize is given")
    result = measure_ddp(arguments.model_dir, arguments.steps, arguments.warmup, arguments.rows)
    if result.pop("is_main"):
        result["command"] = " ".join(sys.argv)
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        arguments.out.write_text(json.dumps(result, indent=2) + "\n")
        log.info("%s", result)


if __name__ == "__main__":
    main()
