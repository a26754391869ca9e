"""Evaluation generation throughput: plain `generate()` against the project's fast path, in one run on the same
4-bit model, adapter and prompts.

    python -m bench.make_random_mistral /tmp/mistral-7b-random
    python -m bench.eval_bench /tmp/mistral-7b-random --out bench/results/eval_h100.json \
        [--batch-size 128 --max-new-tokens 128 --prompts 256 --variants plain,graphed,graphed_dequantized,auto]

The model loads in NF4 (alpaca_qlora.models.loading.load_model, plan_quantization("nf4", device)) with a freshly
initialised, non-zero LoRA adapter on the seven projections (the Mistral profile's LoRA; `--profile PATH`: another
profile's, such as a family's), as the fine-tuned evaluation runs; prompts are Alpaca-formatted instructions of Alpaca
length, tokenized by the model's tokenizer, greedy with the evaluation's stop rules (bench/eval_variants.py). The
variants, in this order on the same model object: plain, graphed, graphed_folded, fast, graphed_dequantized,
graphed_grouped, auto, auto_folded, merged_bf16 (what each runs: bench/eval_variants.py).
Each reports new tokens/s, wall time, peak GPU memory, how many rows differ from plain (for merged_bf16 that
is the precision change's effect, not a bug), and for graphed variants the decoding phases' seconds (prefill,
capture, decode, host checks). `--profile-steps N` adds, for each graphed variant, torch.profiler's top kernels
per eager decoding step (bench/decode_profile.py). `under_11_gib` names the variants a 12 GB card can run;
`--agreement FILE` copies `agreement_on_sure_model` from bench/sure_model.py's JSON. A random-init model never
emits EOS, so every row runs to max_new_tokens and dropping finished rows saves nothing here (recorded in the
JSON). Prints a table last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.generation import (
    Recorder,
    generate,
    resolve_generation_method,
)
from alpaca_qlora.models.loading import load_tokenizer
from alpaca_qlora.stage import configure_logging
from bench import command_line
from bench.decode_profile import decode_profile, profile_table
from bench.eval_variants import VARIANTS, build_model, build_prompts, prepare
from bench.train_variants import add_profile_argument, use_profile

log = logging.getLogger("eval_bench")
SMALL_CARD_GIB = 11.0  # what a 12 GB card leaves for one process

def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else None


class PhaseTimer(Recorder):
    """Seconds per decoding phase, summed over batches; synchronizes the device at each phase's end, so they are
    device time. `host_check`: the stop checks' CPU time, which overlaps decoding on CUDA."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.started = device, {}, time.perf_counter()

    def begin(self) -> None:
        self.started = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.started
        self.started = now

    @contextlib.contextmanager
    def host_work(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds["host_check"] = self.seconds.get("host_check", 0.0) + time.perf_counter() - started


def measure(model: Any, tokenizer: Any, prompts: list[str], *, variant: str, batch_size: int, max_new_tokens: int,
            device: str, warmup: bool, profile_steps: int = 0) -> dict[str, Any]:
    markers = get_template("alpaca").stop_markers
    method = resolve_generation_method(VARIANTS[variant][0], device, model)  # auto: what the stage would run
    if warmup:  # compile / cuDNN / allocator warm-up on one batch, a few tokens
        generate(model, tokenizer, prompts[:batch_size], max_new_tokens=4, batch_size=batch_size,
                 stop_markers=markers, progress=False, method=method)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = PhaseTimer(torch.device(device))
    started = time.perf_counter()
    generations, stats = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  stop_markers=markers, progress=False, method=method, recorder=timer)
    timings = timer.seconds if method == "graphed" else {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    result = {"variant": variant, "method": method, "wall_s": round(wall, 2), "new_tokens": stats["new_tokens"],
              "new_tokens_per_s": round(stats["new_tokens"] / wall, 1), "peak_memory_gib": peak_gib(device),
              "stopped_by_eos": sum(g.stopped_by_eos for g in generations),
              "generations": [(g.raw, g.new_tokens, g.stopped_by_eos) for g in generations]}
    if timings:  # graphed: where the wall time went (decode steps = batches x max_new_tokens at most)
        batches = -(-len(prompts) // batch_size)
        result["phases_s"] = {name: round(value, 3) for name, value in timings.items()}
        decoding = sum(value for phase, value in timings.items() if phase != "host_check")
        result["phases_s"]["outside_decoding"] = round(wall - decoding, 3)
        result["decode_ms_per_step_at_most_steps"] = round(1000 * timings.get("decode", 0.0) /
                                                           (batches * max(max_new_tokens - 1, 1)), 2)
    if profile_steps and method == "graphed" and device.startswith("cuda"):
        result["decode_profile"] = decode_profile(model, tokenizer, prompts, batch_size=batch_size,
                                                  steps=profile_steps)
        log.info("%s", profile_table(variant, result["decode_profile"]))
    return result


def run(model_dir: str, variants: list[str], *, prompts: int, batch_size: int, max_new_tokens: int, device: str,
        warmup: bool, profile_steps: int = 0) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    texts = build_prompts(prompts)
    results: list[dict[str, Any]] = []
    model, _ = build_model(model_dir, device)
    state = {"weights": "nf4", "lora": "peft"}
    for variant in variants:
        log.info("variant %s", variant)
        try:
            prepare(model, variant, state, device)
            results.append(measure(model, tokenizer, texts, variant=variant, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, device=device, warmup=warmup,
                                   profile_steps=profile_steps))
            results[-1]["weights"] = f"{state['weights']}, LoRA {state['lora']}"
            log.info("%s: %s new tokens/s", variant, results[-1]["new_tokens_per_s"])
        except Exception as error:  # record and go on: one broken variant must not lose the others
            log.exception("variant %s failed", variant)
            results.append({"variant": variant, "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()[-3000:]})
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    by_variant = {r["variant"]: r for r in results if "error" not in r}
    plain = by_variant.get("plain")
    summary: dict[str, Any] = {}
    for name, result in by_variant.items():
        if plain and name != "plain":
            pairs = [(a[0], b[0]) for a, b in zip(plain["generations"], result["generations"], strict=True)]
            differing = [(a, b) for a, b in pairs if a != b]
            result["rows_differing_from_plain"] = len(differing)
            # where rows part ways: late (near-tie logits of a random-init model) or early (a real discrepancy)
            result["differing_rows_shared_prefix_chars"] = (
                round(sum(shared_prefix(a, b) for a, b in differing) / len(differing), 1) if differing else None)
            result["speedup_vs_plain"] = round(result["new_tokens_per_s"] / plain["new_tokens_per_s"], 3)
    auto = next((name for name in ("auto", "graphed_dequantized", "graphed") if name in by_variant), None)
    if plain and auto:  # the evaluate stage's default path, or the nearest measured
        summary["eval_speedup"] = by_variant[auto]["speedup_vs_plain"]
        summary["eval_speedup_variant"] = auto
        summary["identical_to_plain"] = by_variant[auto]["rows_differing_from_plain"] == 0
    summary["by_variant"] = {name: {key: result.get(key) for key in ("speedup_vs_plain", "rows_differing_from_plain")}
                             for name, result in by_variant.items() if name != "plain"}
    if plain:
        fastest = max(by_variant.values(), key=lambda r: r["new_tokens_per_s"])
        summary["fastest"] = {"variant": fastest["variant"], "speedup_vs_plain": fastest.get("speedup_vs_plain", 1.0)}
    # the 12 GB path: variants whose peak stays under 11 GiB, and the fastest of them
    small = [r for r in by_variant.values()
             if r["peak_memory_gib"] is not None and r["peak_memory_gib"] < SMALL_CARD_GIB]
    summary["under_11_gib"] = {r["variant"]: r["peak_memory_gib"] for r in small}
    if small and plain:
        best = max(small, key=lambda r: r["new_tokens_per_s"])
        summary["fastest_under_11_gib"] = {"variant": best["variant"],
                                           "speedup_vs_plain": best.get("speedup_vs_plain", 1.0)}
    return summary


def shared_prefix(first: str, second: str) -> int:
    return next((index for index, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


def table(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [f"{'variant':<20} {'new tok/s':>10} {'wall s':>8} {'peak GiB':>9} {'differ':>7} {'speedup':>8}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['variant']:<20} ERROR {r['error'][:90]}")
            continue
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(f"{r['variant']:<20} {r['new_tokens_per_s']:>10.1f} {r['wall_s']:>8.2f} {peak:>9} "
                     f"{r.get('rows_differing_from_plain', 0):>7} {r.get('speedup_vs_plain', 1.0):>8.2f}")
    lines += [f"{r['variant']} phases s: {r['phases_s']}, decode <= {r['decode_ms_per_step_at_most_steps']} ms/step"
              for r in results if "phases_s" in r]
    lines += [f"{key}: {value}" for key, value in summary.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--variants", default="plain,graphed,graphed_dequantized,auto",
                        help=f"from {', '.join(VARIANTS)}, in that order; dequantizing, folding and merging are "
                             "in place, so graphed_folded and graphed_grouped exclude the PEFT-LoRA variants after "
                             "them, and merged_bf16 the folded and grouped ones")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile this many eager decoding steps per graphed variant (top kernels; CUDA only)")
    parser.add_argument("--agreement", type=Path,
                        help="bench/sure_model.py's JSON: its agreement figures join this one")
    add_profile_argument(parser)
    arguments = parser.parse_args()
    configure_logging()
    use_profile(arguments.profile)
    variants = [v for v in arguments.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    results = run(arguments.model_dir, variants, prompts=arguments.prompts, batch_size=arguments.batch_size,
                  max_new_tokens=arguments.max_new_tokens, device=arguments.device, warmup=not arguments.no_warmup,
                  profile_steps=arguments.profile_steps)
    summary = summarize(results)
    eos_rows = sum(r.get("stopped_by_eos", 0) for r in results)
    payload = {
        "command": command_line(),
        "device": torch.cuda.get_device_name(0) if arguments.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "batch_size": arguments.batch_size, "max_new_tokens": arguments.max_new_tokens, "prompts": arguments.prompts,
        **summary,
        **({"agreement_on_sure_model": json.loads(arguments.agreement.read_text())["agreement_on_sure_model"]}
           if arguments.agreement and arguments.agreement.is_file() else {}),
        "note": ("random-init weights never emit EOS: every row runs to max_new_tokens, so dropping finished rows "
                 "saves nothing in this benchmark" if eos_rows == 0 else f"{eos_rows} rows stopped by EOS"),
        "results": [{k: v for k, v in r.items() if k != "generations"} for r in results],
        "sample_generations": {r["variant"]: r["generations"][:3] for r in results if "generations" in r},
    }
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(table(results, summary))


if __name__ == "__main__":
    main()
