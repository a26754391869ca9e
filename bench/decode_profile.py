"""Where a decoding step's device time goes: torch.profiler over a few eager steps of the graphed loop.

The kernels of prefill + N steps minus those of the prefill alone, divided by N: each kernel's time per step, so one
GPU call shows whether the step is bound by the weight GEMMs, attention, dequantization or the small element-wise
kernels (norms, rotary, casts) that a CUDA graph launches for free but still runs.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from alpaca_qlora.data.formatting import encode_prompt
from alpaca_qlora.generation.batching import left_pad
from alpaca_qlora.generation.graphed import graphed_generate
from bench.train_profile import categorize


def _kernel_times(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                  eos_token_id: int) -> dict[str, list[float]]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        graphed_generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, use_graph=False)
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in profiler.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        micros = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        totals[event.key][0] += micros
        totals[event.key][1] += event.count
    return totals


def decode_profile(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int, steps: int,
                   top: int = 15) -> dict[str, Any]:
    """Per-step device time of `steps` eager decoding steps at `batch_size` rows, by kernel and by category."""
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts[:batch_size]]
    input_ids, attention_mask = left_pad(encoded, tokenizer.pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    run = dict(eos_token_id=tokenizer.eos_token_id)
    _kernel_times(model, input_ids, attention_mask, max_new_tokens=2, **run)  # warm-up
    prefill = _kernel_times(model, input_ids, attention_mask, max_new_tokens=1, **run)
    decoding = _kernel_times(model, input_ids, attention_mask, max_new_tokens=1 + steps, **run)
    per_step = {name: ((micros - prefill.get(name, [0.0, 0])[0]) / steps / 1000,
                       (count - prefill.get(name, [0.0, 0])[1]) / steps)
                for name, (micros, count) in decoding.items()}
    per_step = {name: value for name, value in per_step.items() if value[0] > 0}
    total_ms = sum(ms for ms, _ in per_step.values())
    by_category: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_step.items():
        by_category[categorize(name)] += ms
    ranked = sorted(per_step.items(), key=lambda item: -item[1][0])
    return {
        "batch_rows": len(encoded), "prompt_tokens": int(input_ids.shape[1]), "steps": steps,
        "device_ms_per_step": round(total_ms, 3),
        "kernel_launches_per_step": round(sum(count for _, count in per_step.values()), 1),
        "prefill_device_ms": round(sum(micros for micros, _ in prefill.values()) / 1000, 2),
        "by_category_ms": {name: round(ms, 3) for name, ms in sorted(by_category.items(), key=lambda i: -i[1])},
        "top_kernels": [{"kernel": name[:120], "ms_per_step": round(ms, 3), "calls_per_step": round(count, 1),
                         "share": round(ms / total_ms, 3) if total_ms else None} for name, (ms, count) in ranked[:top]],
    }


def profile_table(name: str, profile: dict[str, Any]) -> str:
    lines = [f"decode profile [{name}]: {profile['device_ms_per_step']} device ms/step, "
             f"{profile['kernel_launches_per_step']} kernels/step, prefill {profile['prefill_device_ms']} ms "
             f"({profile['batch_rows']} rows x {profile['prompt_tokens']} prompt tokens)",
             "  by category: " + ", ".join(f"{key} {value}" for key, value in profile["by_category_ms"].items())]
    lines += [f"  {row['ms_per_step']:>8.3f} ms {row['calls_per_step']:>6.1f}x  {row['kernel']}"
              for row in profile["top_kernels"]]
    return "\n".join(lines)
