"""Training throughput and memory on the GPU: the project's train-stage code path against a plain
transformers + PEFT + bitsandbytes baseline, measured in the same run on the same model and batches.

    python bench/make_random_mistral.py /tmp/mistral-7b-random
    python bench/train_bench.py /tmp/mistral-7b-random --out bench/results/train_h100.json

Workloads:
- dense:  micro-batches of 4 x 2048 tokens, every token real;
- alpaca: Alpaca-length rows (prompt + response lengths drawn from a log-normal fitted to alpaca-style data,
          median ~190 tokens, clipped to [48, 1024]); the baseline pads each micro-batch of 8 rows to its longest
          row, the project packs rows padding-free. The figure that counts is useful (non-pad) tokens/s.
Variants:
- baseline: NF4 double-quant, LoRA r=16 on the seven projections, gradient checkpointing, sdpa, AdamW, bf16
            autocast, padded batches;
- project:  the train stage's code path (alpaca_qlora.models.load_model, training.apply_liger_kernels,
            training.attach_lora, its collators) with its GPU defaults: Liger kernels and packing.
Prints a table last and writes JSON with `train_speedup`, `train_peak_memory_ratio`, `useful_tokens_speedup`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.config import LoraParams
from alpaca_qlora.formatting import IGNORE_INDEX
from alpaca_qlora.models import load_model, plan_quantization
from alpaca_qlora.stage import configure_logging
from alpaca_qlora.training import PackedCollator, ResponseOnlyCollator, apply_liger_kernels, attach_lora

log = logging.getLogger("train_bench")
VOCAB_LOW, VOCAB_HIGH = 100, 31000


@dataclass
class Measurement:
    variant: str
    workload: str
    steps: int
    step_time_s: float
    tokens_per_s: float
    useful_tokens_per_s: float
    peak_memory_gib: float
    losses: list[float]


def dense_batches(count: int, rows: int, length: int, seed: int) -> list[list[dict[str, list[int]]]]:
    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        batch = []
        for _ in range(rows):
            ids = [1] + [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(length - 1)]
            batch.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
        batches.append(batch)
    return batches


def alpaca_rows(count: int, seed: int) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        total = int(min(1024, max(48, rng.lognormvariate(math.log(190), 0.6))))
        prompt = max(8, int(total * rng.uniform(0.35, 0.75)))
        ids = [1] + [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(total - 1)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def baseline_model(model_dir: str, gradient_checkpointing: bool = True) -> Any:
    """transformers + PEFT + bitsandbytes as their docs show it: the reference every ratio is against."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="sdpa", dtype=torch.bfloat16, device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, config)


def project_model(model_dir: str, *, liger: bool, gradient_checkpointing: bool) -> Any:
    """The train stage's code path (stages/train.py) with its GPU settings."""
    plan = plan_quantization("nf4", "cuda")
    model = load_model(model_dir, plan, device="cuda")
    if liger:
        apply_liger_kernels(model, "cuda")
    model = attach_lora(model, LoraParams(), quantized=True, gradient_checkpointing=gradient_checkpointing)
    model.config.use_cache = False
    return model


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
        batch = {key: value.to("cuda", non_blocking=True) for key, value in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= warmup:
            timed_tokens += batch["input_ids"].numel()
            timed_useful += useful_tokens[step]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    steps = len(batches) - warmup
    del optimizer
    return Measurement(variant=variant, workload=workload, steps=steps, step_time_s=round(elapsed / steps, 4),
                       tokens_per_s=round(timed_tokens / elapsed, 1), useful_tokens_per_s=round(timed_useful / elapsed, 1),
                       peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                       losses=[round(value, 4) for value in losses])


def collate(rows_per_batch: list[list[dict[str, list[int]]]], packing: bool) -> tuple[list[dict], list[int]]:
    collator = PackedCollator() if packing else ResponseOnlyCollator(pad_token_id=0)
    batches, useful = [], []
    for rows in rows_per_batch:
        batches.append(collator(rows))
        useful.append(sum(len(row["input_ids"]) for row in rows))
    return batches, useful


def chunk(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[start : start + size] for start in range(0, len(rows) - size + 1, size)]


def run(model_dir: str, steps: int, warmup: int, variants: list[str]) -> list[Measurement]:
    dense = dense_batches(steps + warmup, rows=4, length=2048, seed=0)
    rows = alpaca_rows(64 * (steps + warmup), seed=1)
    results: list[Measurement] = []
    for variant in variants:  # baseline first: Liger patches some functions module-wide
        log.info("variant %s: loading", variant)
        if variant == "baseline":
            model = baseline_model(model_dir)
        else:
            model = project_model(model_dir, liger=variant in ("project", "liger"), gradient_checkpointing=True)
        packing = variant in ("project", "packing")
        batches, useful = collate(dense, packing)
        results.append(measure(model, batches, variant=variant, workload="dense_4x2048", warmup=warmup,
                               useful_tokens=useful))
        log.info("%s", results[-1])
        alpaca_micro = chunk(rows, 32 if packing else 8)[: steps + warmup]
        batches, useful = collate(alpaca_micro, packing)
        results.append(measure(model, batches, variant=variant,
                               workload="alpaca_packed_32rows" if packing else "alpaca_padded_8rows",
                               warmup=warmup, useful_tokens=useful))
        log.info("%s", results[-1])
        del model, batches
        torch.cuda.empty_cache()
    return results


def ratios(results: list[Measurement], variant: str) -> dict[str, Any]:
    """One variant against the baseline of the same run, per workload."""
    by_key = {(m.variant, m.workload.split("_")[0]): m for m in results}
    out: dict[str, Any] = {}
    base_dense, dense = by_key.get(("baseline", "dense")), by_key.get((variant, "dense"))
    base_alpaca, alpaca = by_key.get(("baseline", "alpaca")), by_key.get((variant, "alpaca"))
    if base_dense and dense:
        out["train_speedup"] = round(dense.tokens_per_s / base_dense.tokens_per_s, 3)
        out["train_peak_memory_ratio"] = round(dense.peak_memory_gib / base_dense.peak_memory_gib, 3)
        out["dense_loss_max_abs_diff"] = round(max(abs(a - b) for a, b in zip(base_dense.losses, dense.losses)), 4)
    if base_alpaca and alpaca:
        out["useful_tokens_speedup"] = round(alpaca.useful_tokens_per_s / base_alpaca.useful_tokens_per_s, 3)
        out["alpaca_peak_memory_ratio"] = round(alpaca.peak_memory_gib / base_alpaca.peak_memory_gib, 3)
    return out


def summarize(results: list[Measurement]) -> dict[str, Any]:
    variants = sorted({m.variant for m in results} - {"baseline"})
    summary: dict[str, Any] = dict(ratios(results, "project")) if "project" in variants else {}
    summary["by_variant"] = {variant: ratios(results, variant) for variant in variants}
    return summary


def table(results: list[Measurement], summary: dict[str, Any]) -> str:
    lines = [f"{'variant':<10} {'workload':<22} {'step s':>8} {'tok/s':>9} {'useful tok/s':>13} {'peak GiB':>9}"]
    for m in results:
        lines.append(f"{m.variant:<10} {m.workload:<22} {m.step_time_s:>8.3f} {m.tokens_per_s:>9.0f} "
                     f"{m.useful_tokens_per_s:>13.0f} {m.peak_memory_gib:>9.2f}")
    lines += [f"{key}: {value}" for key, value in summary.items() if key != "by_variant"]
    lines += [f"{variant}: {values}" for variant, values in summary.get("by_variant", {}).items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="baseline,liger,project",
                        help="baseline first; liger = Liger kernels, packing = packing, project = both")
    arguments = parser.parse_args()
    configure_logging()
    results = run(arguments.model_dir, arguments.steps, arguments.warmup, arguments.variants.split(","))
    summary = summarize(results)
    payload = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        **summary,
        "results": [m.__dict__ for m in results],
    }
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(table(results, summary))


if __name__ == "__main__":
    main()
