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
Variants:
- baseline: NF4 double-quant, the Mistral profile's LoRA (r=16 on the seven projections) with the reference dropout
            (REFERENCE_LORA_DROPOUT), gradient checkpointing, sdpa, AdamW, bf16 autocast, padded batches;
- project:  the train stage's code path (its model from training.model.build_trainable_model, its collators) with the
            Mistral profile's settings as the stage resolves them on CUDA (project_settings: Liger kernels, packing,
            frozen weights in bf16, gradient checkpointing, checkpoint offload, LoRA dropout);
- liger:    the train stage's code path with Liger kernels only (padded batches, PEFT's fp32 upcast);
- unpacked: project without packing (padded micro-batches);
- offload / gpu_checkpoints: project with checkpoints offloaded to pinned host memory / kept on the GPU;
- dropout:  project with the reference LoRA dropout instead of the profile's;
- nockpt:   project without gradient checkpointing (more memory, no recomputation);
- unfused / nockpt_unfused: project / nockpt with PEFT's own LoRA forward instead of the fused one
            (train.fused_lora, training/fused_lora.py: the adapter's term by addmm, a hand-written backward).
Then a memory table with the project's defaults: peak memory per micro-batch of k x 2048 tokens, and the largest k
under 11 GiB (a 12 GB card such as the RTX 3060).
Prints a table last and writes JSON with `train_speedup`, `train_peak_memory_ratio`, `useful_tokens_speedup`.
`--profile PATH` puts another profile (a family's: gpu_run.sh's families phase) in the Mistral profile's place for
every variant; `--memory-rows=` (empty) skips the memory table; without baseline the ratios against it are left out.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.profiles import profile_params
from alpaca_qlora.stage import configure_logging
from alpaca_qlora.training.fused_lora import fused_4bit_bases, keep_dequantized
from alpaca_qlora.training.model import (
    SpeedSwitches,
    all_linear_targets,
    build_trainable_model,
    peft_target_modules,
    resolve_speed_switches,
    uses_all_linear,
)
from alpaca_qlora.training.packing import VARLEN_ATTENTION, packed_attention
from bench import command_line
from bench.train_results import Measurement, summarize, table
from bench.workloads import alpaca_micro_batches, collate, dense_batches, workloads

log = logging.getLogger("train_bench")
ROOT = Path(__file__).resolve().parents[1]
MISTRAL_PROFILE = ROOT / "profiles" / "mistral-7b.yaml"


# The LoRA dropout the baseline (and Unsloth's reference variant) trains with: PEFT's QLoRA examples' value, and the
# Mistral profile's before it took Unsloth's dropout-0 fast path. The loss check of the profile's settings is
# against this baseline, so it covers the dropout change too.
REFERENCE_LORA_DROPOUT = 0.05


# The one place that holds the profile the bench's variants take: set once by each script's --profile (use_profile),
# read by train_bench, eval_bench, unsloth_bench and sure_model through bench_profile() and profile_lora().
_profile = {"path": MISTRAL_PROFILE}


def use_profile(path: str | Path) -> None:
    """The profile whose LoRA and speed settings every bench variant takes: the Mistral one unless a family's bench
    names its own (--profile)."""
    _profile["path"] = Path(path)


def bench_profile() -> Any:
    """The real run's params (the bench's profile over params.yaml), for every variant and script."""
    return profile_params(_profile["path"], ROOT / "params.yaml")


def profile_lora() -> Any:
    """LoRA as the real run sets it."""
    return bench_profile().lora





def baseline_model(model_dir: str, gradient_checkpointing: bool = True) -> Any:
    """transformers + PEFT + bitsandbytes as their docs show it: the reference every ratio is against."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="sdpa", dtype=torch.bfloat16, device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return get_peft_model(model, reference_lora_config(profile_lora()))


def reference_lora_config(lora: Any) -> Any:
    """The baseline's LoraConfig: the profile's rank, scaling and targets (all-linear as the train stage hands it
    to PEFT), the reference dropout."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=REFERENCE_LORA_DROPOUT, task_type="CAUSAL_LM",
                      target_modules=peft_target_modules(lora.target_modules))


def target_names(lora: Any, model_config: Any) -> list[str]:
    """The profile's LoRA targets as layer names, all-linear resolved by PEFT as the train stage resolves it: for a
    library that takes a list of names (Unsloth)."""
    if uses_all_linear(lora.target_modules):
        return all_linear_targets(model_config)
    return list(lora.target_modules)


def project_model(model_dir: str, *, liger: bool, gradient_checkpointing: bool, frozen_dtype: str,
                  checkpoint_offload: bool, lora_dropout: float, fused_lora: bool, shardable: bool = False) -> Any:
    """The train stage's model (training.model.build_trainable_model) with the variant's switches; `shardable`
    stores the 4-bit weights so FSDP can shard them, as the stage does under fsdp."""
    lora = dataclasses.replace(profile_lora(), dropout=lora_dropout)
    switches = SpeedSwitches(liger_kernels=liger, gradient_checkpointing=gradient_checkpointing, fused_lora=fused_lora)
    model = build_trainable_model(model_dir, plan_quantization("nf4", "cuda"), lora, switches, device="cuda",
                                  frozen_dtype=frozen_dtype, checkpoint_offload=checkpoint_offload,
                                  shardable=shardable)
    model.config.use_cache = False  # as training.trainer.run_training sets it
    return model


def project_settings(distributed: str = "none") -> dict[str, Any]:
    """The bench profile's speed settings on CUDA, as the train stage resolves them under `distributed`, plus
    whether it packs."""
    params = bench_profile()
    train = dataclasses.replace(params.train, distributed=distributed)
    switches = resolve_speed_switches(train, "cuda", params.lora, liger_installed=True)
    return {"liger": switches.liger_kernels, "gradient_checkpointing": switches.gradient_checkpointing,
            "fused_lora": switches.fused_lora, "frozen_dtype": params.train.frozen_dtype,
            "checkpoint_offload": params.train.checkpoint_offload, "lora_dropout": params.lora.dropout,
            "packing": params.train.packing}


# name: what the variant changes in the profile's settings (`project`: nothing)
VARIANTS: dict[str, dict[str, Any]] = {
    "project": {},
    "liger": {"gradient_checkpointing": True, "frozen_dtype": "fp32", "packing": False, "checkpoint_offload": False,
              "lora_dropout": REFERENCE_LORA_DROPOUT, "fused_lora": False},
    "unpacked": {"packing": False},
    "offload": {"checkpoint_offload": True},
    "gpu_checkpoints": {"checkpoint_offload": False},
    "dropout": {"lora_dropout": REFERENCE_LORA_DROPOUT, "fused_lora": False},  # as auto resolves it there
    "nockpt": {"gradient_checkpointing": False, "checkpoint_offload": False},
    "unfused": {"fused_lora": False},
    "nockpt_unfused": {"gradient_checkpointing": False, "checkpoint_offload": False, "fused_lora": False},
    # every frozen weight kept dequantized, as the memory plan does where the budget has room (80 GiB)
    "nockpt_dequantized": {"gradient_checkpointing": False, "checkpoint_offload": False, "dequantized": True},
    "dequantized": {"dequantized": True},
}


def release_memory() -> float:
    """Free the previous variant for real (PEFT models hold reference cycles) and say what is still allocated."""
    gc.collect()
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_allocated() / 2**30, 3)


def build_variant(model_dir: str, variant: str) -> tuple[Any, bool]:
    log.info("variant %s: %.3f GiB allocated before loading", variant, release_memory())
    if variant == "baseline":
        return baseline_model(model_dir), False
    settings = {**project_settings(), **VARIANTS[variant]}
    packing, dequantized = settings.pop("packing"), settings.pop("dequantized", False)
    model = project_model(model_dir, **settings)
    if dequantized:
        keep_dequantized(fused_4bit_bases(model), torch.bfloat16)
    if packing:
        packed_attention(model, "cuda")
    return model, packing


def uses_varlen(model: Any) -> bool:
    """Whether packed_attention switched the model to the variable-length kernel (its loss check applies)."""
    return model.get_base_model().config._attn_implementation == VARLEN_ATTENTION


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






def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    """--profile, the same in every bench script, so a family's figures all come from its own profile's LoRA (its
    targets: Phi-3's fused ones) and speed settings; the script passes it to use_profile."""
    parser.add_argument("--profile", type=Path, default=MISTRAL_PROFILE,
                        help="the profile whose LoRA and speed settings the variants take (default: Mistral's)")


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
