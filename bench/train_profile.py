"""Where a training step's GPU time goes, by kernel category, for the baseline and the project's code path.

Kernel time per step in GEMM, NF4 dequantization, attention, Liger/Triton, optimizer, copies/casts and other
elementwise kernels, and GPU idle time.

train_bench.py says how fast each variant is; this says what holds the speedup back, so the README can name it.
Same models, batches and step as train_bench.measure (dense 4 x 2048 workload, bf16 autocast, AdamW):

    python -m bench.train_profile /tmp/mistral-7b-random --out bench/results/train_profile_h100.json

Each variant: `--warmup` steps, `--steps` steps timed without the profiler, then `--steps` steps under
torch.profiler (CPU + CUDA). Kernel times are summed per category by kernel name (first matching pattern wins).
gpu_idle = profiled wall time - kernel time (launch overhead, host syncs, profiler overhead; negative if kernels
overlap on several streams). Prints a table last and writes JSON.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import logging
import pstats
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from alpaca_qlora.stage import configure_logging
from bench import command_line
from bench.train_bench import train_step
from bench.train_variants import VARIANTS, build_variant, project_settings, release_memory
from bench.workloads import collate, dense_batches

log = logging.getLogger("train_profile")

# Checked in order on the lower-cased kernel name; the first match wins. Attention before gemm (xformers/cutlass
# attention kernels contain "cutlass"), NF4 first (bitsandbytes).
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("nf4_dequantize", re.compile(r"kdequantize|dequantize")),
    ("attention", re.compile(r"flash|fmha|attention|efficient|sdpa")),
    ("gemm", re.compile(r"gemm|xmma|cutlass|kernel2|ampere_|sm80_|sm90_|nvjet|cublas|matmul")),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach")),
    ("copy_cast", re.compile(r"copy|memcpy|memset|fill|(?<!with)(?<!broad)cast")),  # not LoadWithCast/broadcast
    ("liger_triton", re.compile(r"liger|triton|rms_norm|swiglu|rope|cross_entropy|^[a-z_][a-z0-9_]*$")),
    ("elementwise_other", re.compile(r"")),
]
# ^identifier$ above: Triton kernels are bare function names (_swiglu_forward_kernel, element_mul_kernel); CUDA C++
# kernels read "void ns::kernel<...>(...)", and bare-named cuBLAS kernels (sm90_xmma_..., nvjet_...) match gemm first.
FLOPS_FORMULA = ("2 * frozen_linear_params * tokens_per_step * passes; passes = 3 with gradient checkpointing "
                 "(forward, recompute, input-grad backward), 2 without; frozen_linear_params = the seven projections "
                 "of every layer from model.config (lm_head, LoRA and attention matmuls left out, though their time "
                 "counts in gemm): an estimate")


def categorize(kernel_name: str) -> str:
    name = kernel_name.lower()
    return next(category for category, pattern in CATEGORIES if pattern.search(name))


def aggregate(kernels: Iterable[tuple[str, float, int]], steps: int, wall_s_per_step: float,
              top: int = 15) -> dict[str, Any]:
    """(kernel name, total seconds, launches) over `steps` steps -> per-step seconds by category and share of wall."""
    per_category = {category: 0.0 for category, _ in CATEGORIES}
    by_name: dict[str, float] = {}
    launches = 0
    for name, seconds, count in kernels:
        per_category[categorize(name)] += seconds / steps
        by_name[name] = by_name.get(name, 0.0) + seconds / steps
        launches += count
    kernel_s = sum(per_category.values())
    return {
        "wall_s_per_step": round(wall_s_per_step, 5),
        "kernel_s_per_step": round(kernel_s, 5),
        "gpu_idle_s_per_step": round(wall_s_per_step - kernel_s, 5),
        "kernel_launches_per_step": round(launches / steps),
        "categories": {category: {"s_per_step": round(seconds, 5), "share_of_wall": round(seconds / wall_s_per_step, 4)}
                       for category, seconds in per_category.items()},
        "top_kernels": [{"name": name, "category": categorize(name), "s_per_step": round(seconds, 5)}
                        for name, seconds in sorted(by_name.items(), key=lambda item: -item[1])[:top]],
    }


def frozen_linear_params(config: Any) -> int:
    """Weights of q, k, v, o, gate, up and down over all layers (grouped-query attention aware)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * config.intermediate_size
    return config.num_hidden_layers * per_layer


def kernel_events(prof: profile) -> list[tuple[str, float, int]]:
    """Device-side kernels (and memcpy/memset) from the profile: (name, total seconds, count); GPU annotations out."""
    out = []
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:  # torch before the cuda -> device rename
            device_us = event.self_cuda_time_total
        out.append((event.key, device_us / 1e6, event.count))
    return out


def train_steps(model: Any, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]]) -> float:
    """train_bench.measure's step over the batches; seconds per step, synchronized."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        train_step(model, optimizer, batch).item()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / len(batches)


def host_hotspots(model: Any, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
                  top: int = 25) -> dict[str, Any]:
    """The host's side of the same steps under cProfile: the Python functions (and the C calls they make) that hold
    the host longest per step, by their own time; where the host, not the GPU, sets a step's pace (small micro-batches)
    these are what it spends it on."""
    profiler = cProfile.Profile()
    profiler.enable()
    wall = train_steps(model, optimizer, batches)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    steps = len(batches)
    return {"wall_s_per_step_under_cprofile": round(wall, 5), "top_by_own_time": [
        {"function": f"{Path(file).name}:{line}({name})", "calls_per_step": round(calls / steps, 1),
         "own_ms_per_step": round(1e3 * own / steps, 2), "cumulative_ms_per_step": round(1e3 * cumulative / steps, 2)}
        for (file, line, name), (_, calls, own, cumulative, _) in ranked]}


def profile_variant(model_dir: str, variant: str, *, warmup: int, steps: int, rows: int, length: int,
                    host: bool = False) -> dict[str, Any]:
    model, packing = build_variant(model_dir, variant)
    batches, _ = collate(dense_batches(warmup + (3 if host else 2) * steps, rows=rows, length=length, seed=0), packing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    train_steps(model, optimizer, batches[:warmup])
    unprofiled = train_steps(model, optimizer, batches[warmup : warmup + steps])
    profiled_batches = batches[warmup + steps : warmup + 2 * steps]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = train_steps(model, optimizer, profiled_batches)
    result = aggregate(kernel_events(prof), steps, wall)
    checkpointing = variant == "baseline" or {**project_settings(), **VARIANTS[variant]}["gradient_checkpointing"]
    tokens = sum(batch["input_ids"].numel() for batch in profiled_batches) / steps
    params = frozen_linear_params(model.config)
    flops = 2 * params * tokens * (3 if checkpointing else 2)
    gemm_s = result["categories"]["gemm"]["s_per_step"]
    result.update(unprofiled_wall_s_per_step=round(unprofiled, 5), tokens_per_step=int(tokens),
                  gradient_checkpointing=checkpointing, frozen_linear_params=params,
                  gemm_flops_per_step_estimate=flops,
                  gemm_tflops_per_s=round(flops / gemm_s / 1e12, 1) if gemm_s else None)
    if host:
        result["host"] = host_hotspots(model, optimizer, batches[warmup + 2 * steps :])
    del model, optimizer, batches, prof
    release_memory()
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    names = [name for name, result in results.items() if "error" not in result]
    lines = [f"{'ms per step (% of wall)':<24}" + "".join(f"{name:>20}" for name in names)]
    rows = [(category, lambda r, c=category: r["categories"][c]["s_per_step"]) for category, _ in CATEGORIES]
    rows += [("kernel total", lambda r: r["kernel_s_per_step"]), ("gpu idle", lambda r: r["gpu_idle_s_per_step"]),
             ("wall (profiled)", lambda r: r["wall_s_per_step"])]
    for label, value in rows:
        cells = [f"{value(results[n]) * 1e3:9.1f} ({value(results[n]) / results[n]['wall_s_per_step']:6.1%})"
                 for n in names]
        lines.append(f"{label:<24}" + "".join(f"{cell:>20}" for cell in cells))
    lines.append(f"{'wall (unprofiled) ms':<24}" + "".join(
        f"{results[n]['unprofiled_wall_s_per_step'] * 1e3:>20.1f}" for n in names))
    lines.append(f"{'gemm TFLOP/s (estimate)':<24}" + "".join(f"{str(results[n]['gemm_tflops_per_s']):>20}"
                                                            for n in names))
    lines += [f"{name}: {result['error']}" for name, result in results.items() if "error" in result]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default="baseline,project",
                        help=f"baseline first (Liger patches module-wide), then any of: {', '.join(VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--host", action="store_true",
                        help="then --steps more steps under cProfile: the host's hotspots per step")
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_profile.py profiles CUDA kernels and needs a CUDA GPU; none is visible here.")
    configure_logging()
    results: dict[str, dict[str, Any]] = {}
    for variant in arguments.variants.split(","):
        log.info("variant %s: profiling %d steps after %d warmup", variant, arguments.steps, arguments.warmup)
        try:
            results[variant] = profile_variant(arguments.model_dir, variant, warmup=arguments.warmup,
                                               steps=arguments.steps, rows=arguments.rows, length=arguments.length,
                                               host=arguments.host)
        except torch.OutOfMemoryError as error:
            log.warning("variant %s: out of memory (%s)", variant, str(error).splitlines()[0])
            results[variant] = {"error": "out of memory"}
            release_memory()
            continue
        log.info("variant %s: %s", variant, {k: v for k, v in results[variant].items()
                                             if k not in ("top_kernels", "host")})
        for entry in results[variant].get("host", {}).get("top_by_own_time", []):
            log.info("host %s", entry)
    payload = {
        "command": command_line(),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "workload": f"dense_{arguments.rows}x{arguments.length}",
        "gemm_flops_estimate": FLOPS_FORMULA,
        "variants": results,
    }
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
