"""Training throughput and memory on the GPU: the project's train-stage code path against a plain
transformers + PEFT + bitsandbytes baseline, measured in the same run on the same model and batches.

    python -m bench.make_random_mistral /tmp/mistral-7b-random
    python -m bench.train_bench /tmp/mistral-7b-random --out bench/results/train_h100.json

Workloads (bench/workloads.py):
- dense:  micro-batches of 4 x 2048 tokens, every token real;
- alpaca: Alpaca-length rows (prompt + response lengths drawn from a log-normal fitted to alpaca-style data,
          median ~190 tokens, clipped to [48, 1024]); the baseline pads each micro-batch of 8 rows to its longest
          row, the project packs all rows once into 2048-token best-fit-decreasing bins and takes 4 bins per
          micro-batch (as the train stage does), attention through torch's varlen flash kernel. The figure that
          counts is useful (non-pad) tokens/s; `padding_share` is padding over computed tokens.
Variants: bench/train_variants.py (baseline, project and the project's switches one at a time).
Then a memory table with the project's defaults: peak memory per micro-batch of k x 2048 tokens, and the largest k
under 11 GiB (a 12 GB card such as the RTX 3060).
Prints a table last and writes JSON with `train_speedup`, `train_peak_memory_ratio`, `useful_tokens_speedup`.
`--profile PATH` puts another profile (a family's: gpu_run.sh's families phase) in the Mistral profile's place for
every variant; `--memory-rows=` (empty) skips the memory table; without baseline the ratios against it are left out.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.stage import configure_logging
from bench import command_line
from bench.train_results import Measurement, summarize, table
from bench.train_variants import VARIANTS, add_profile_argument, build_variant, release_memory, use_profile, uses_varlen
from bench.workloads import alpaca_micro_batches, collate, dense_batches, workloads

log = logging.getLogger("train_bench")
def train_step(model: Any, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimizer step as every variant takes it: bf16 autocast forward, backward, AdamW; returns the loss."""
    batch = {key: value.to("cuda", non_blocking=True) for key, value in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(model: Any, batches: list[dict[str, torch.Tensor]], *, variant: str, workload: str, warmup: int,
            useful_tokens: list[int]) -> Measurement:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    losses: list[float] = []
    timed_tokens = timed_useful = 0
    started = 0.0
    for step, batch in enumerate(batches):
        if step == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
        losses.append(train_step(model, optimizer, batch).item())
        if step >= warmup:
            timed_tokens += batch["input_ids"].numel()
            timed_useful += useful_tokens[step]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    steps = len(batches) - warmup
    del optimizer
    return Measurement(variant=variant, workload=workload, steps=steps, step_time_s=round(elapsed / steps, 4),
                       tokens_per_s=round(timed_tokens / elapsed, 1),
                       useful_tokens_per_s=round(timed_useful / elapsed, 1),
                       peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                       losses=[round(value, 4) for value in losses],
                       padding_share=round(1 - timed_useful / timed_tokens, 4))


def varlen_loss_check(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """The same packed micro-batch's loss under the varlen kernel and under sdpa's block-diagonal mask."""
    losses = {}
    base = model.get_base_model()
    implementation = base.config._attn_implementation
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for name in (implementation, "sdpa"):
            base.set_attn_implementation(name)
            losses[name] = model(**{key: value.to("cuda") for key, value in batch.items()}).loss.item()
    base.set_attn_implementation(implementation)
    model.train()
    return {"attention": implementation, **{f"loss_{name}": round(value, 6) for name, value in losses.items()}}


def run(model_dir: str, steps: int, warmup: int, variants: list[str], *, alpaca_steps: int) -> list[Measurement]:
    dense, rows = workloads(steps, warmup)
    results: list[Measurement] = []
    for variant in variants:  # baseline first: Liger patches some functions module-wide
        log.info("variant %s: loading", variant)
        try:
            model, packing = build_variant(model_dir, variant)
            batches, useful = collate(dense, packing)
            results.append(measure(model, batches, variant=variant, workload="dense_4x2048", warmup=warmup,
                                   useful_tokens=useful))
        except torch.OutOfMemoryError as error:
            log.warning("variant %s: out of memory (%s)", variant, str(error).splitlines()[0])
            model = batches = None
            release_memory()
            continue
        log.info("%s", results[-1])
        batches, useful = collate(alpaca_micro_batches(rows, packing, alpaca_steps + warmup), packing)
        if packing and uses_varlen(model):
            log.info("variant %s: packed loss check %s", variant, varlen_loss_check(model, batches[0]))
        results.append(measure(model, batches, variant=variant,
                               workload="alpaca_packed_32rows" if packing else "alpaca_padded_8rows",
                               warmup=warmup, useful_tokens=useful))
        log.info("%s", results[-1])
        del model, batches
        release_memory()
    return results


def memory_table(model_dir: str, rows: list[int], limit_gib: float) -> dict[str, Any]:
    """Peak memory of the project's defaults per micro-batch of k x 2048 tokens, and the largest k under the limit."""
    model, packing = build_variant(model_dir, "project")
    table: list[dict[str, Any]] = []
    for count in rows:
        batches, useful = collate(dense_batches(2, rows=count, length=2048, seed=count), packing)
        try:
            m = measure(model, batches, variant="project", workload=f"dense_{count}x2048", warmup=1,
                        useful_tokens=useful)
        except torch.OutOfMemoryError:
            release_memory()
            table.append({"rows": count, "tokens": count * 2048, "peak_memory_gib": None, "tokens_per_s": None})
            break
        table.append({"rows": count, "tokens": count * 2048, "peak_memory_gib": m.peak_memory_gib,
                      "tokens_per_s": m.tokens_per_s})
        log.info("memory: %d x 2048 -> %.2f GiB", count, m.peak_memory_gib)
        if m.peak_memory_gib > limit_gib:
            break
    del model
    release_memory()
    fitting = [entry["rows"] for entry in table if entry["peak_memory_gib"] is not None
               and entry["peak_memory_gib"] <= limit_gib]
    return {"limit_gib": limit_gib, "largest_micro_batch_x2048_under_limit": max(fitting) if fitting else 0,
            "by_micro_batch": table}


def write_results(path: Path, results: list[Measurement], summary: dict[str, Any]) -> None:
    payload = {"command": command_line(), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               **summary, "results": [m.__dict__ for m in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    temporary.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--alpaca-steps", type=int, default=None,
                        help="timed steps on Alpaca-length rows (default --steps; the loss check reads the dense ones)")
    parser.add_argument("--variants", default="baseline,project,unpacked,gpu_checkpoints,dropout,nockpt",
                        help=f"baseline first, then any of: {', '.join(VARIANTS)}")
    parser.add_argument("--memory-rows", default="1,2,3,4,6,8",
                        help="micro-batch sizes (x 2048 tokens) for the memory table; empty to skip")
    parser.add_argument("--memory-limit-gib", type=float, default=11.0)
    add_profile_argument(parser)
    arguments = parser.parse_args()
    configure_logging()
    use_profile(arguments.profile)
    results = run(arguments.model_dir, arguments.steps, arguments.warmup, arguments.variants.split(","),
                  alpaca_steps=arguments.alpaca_steps or arguments.steps)
    summary = summarize(results)
    write_results(arguments.out, results, summary)  # kept even if the memory table runs out of time
    if arguments.memory_rows:
        summary["memory"] = memory_table(arguments.model_dir, [int(k) for k in arguments.memory_rows.split(",")],
                                         arguments.memory_limit_gib)
        write_results(arguments.out, results, summary)
    print(table(results, summary))


if __name__ == "__main__":
    main()
