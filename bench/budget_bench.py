"""Training under a memory cap: the project's memory budget against Unsloth's best setting under the same cap.

    python -m bench.budget_bench /tmp/mistral-7b-random --out OUT/budget_project.json
    PYTHONPATH=/tmp/unsloth-site:$PYTHONPATH python -m bench.unsloth_bench /tmp/mistral-7b-random \
        --caps 12,24,80 --out OUT/budget_unsloth.json
    python -m bench.budget_bench --summarize OUT/budget_project.json OUT/budget_unsloth.json --out OUT/budget.json

Each cap is `torch.cuda.set_per_process_memory_fraction`, on the card the call has. The project runs as the train
stage builds it on CUDA (the Mistral profile's settings) with `train.memory_budget_gib` set to the cap: the stage's
own `plan_to_budget` caps the process and chooses which layers keep their activations. Each tool tries micro-batches
of 1, 2 and 4 x 2048 tokens (dense rows, and Alpaca-length rows packed into 2048-token bins); the best useful
tokens/s that fits under a cap is that tool's figure for it. One model per tool serves every cap and micro-batch,
so the caps cost no reload. The loss check trains 50 steps on the same batches under each cap's plan and against
PEFT's LoRA forward with every layer checkpointed. Model FLOPs utilisation counts 4N FLOPs a token (frozen base:
forward and input gradients), N the seven projections' parameters, against the dense bf16 peak below.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.stage import configure_logging
from alpaca_qlora.training import memory_budget
from alpaca_qlora.training.fused_lora import is_lora_linear
from alpaca_qlora.training.memory_budget import GIB, MemoryBudget, cap_process_memory, decoder_layers, plan_to_budget
from bench import command_line
from bench.train_bench import measure
from bench.train_profile import frozen_linear_params
from bench.train_variants import build_variant, release_memory
from bench.workloads import alpaca_micro_batches, alpaca_rows, collate, dense_batches

log = logging.getLogger("budget_bench")
CAPS_GIB = (12.0, 24.0, 80.0)
MICRO_BATCHES = (1, 2, 4)
DENSE_BF16_PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 tensor-core peak (the vendors' figure)


def grid_workloads(micro_batch: int, steps: int, warmup: int, packing: bool) -> dict[str, tuple[list, list]]:
    """Dense rows and packed Alpaca-length bins, `micro_batch` x 2048 tokens a step, the same for both tools."""
    count = steps + warmup
    rows = alpaca_rows(64 * count * micro_batch, seed=1)
    return {"dense": collate(dense_batches(count, rows=micro_batch, length=2048, seed=micro_batch), packing),
            "alpaca_packed": collate(alpaca_micro_batches(rows, True, count, bins=micro_batch), True)}


@contextlib.contextmanager
def capped(cap_gib: float) -> Iterator[None]:
    cap_process_memory(cap_gib, torch.device("cuda", torch.cuda.current_device()))
    try:
        yield
    finally:
        release_memory()
        torch.cuda.set_per_process_memory_fraction(1.0)


def run_grid(model: Any, tool: str, setting: str, *, caps: list[float], steps: int, warmup: int, packing: bool,
             prepare: Callable[[float, int], dict[str, Any]],
             adapt: Callable[[str, dict], dict] = lambda workload, batch: batch) -> list[dict[str, Any]]:
    """Every cap x micro-batch x workload; `prepare(cap, tokens)` readies the model under the cap and says how."""
    results = []
    for micro_batch in MICRO_BATCHES:
        workloads = grid_workloads(micro_batch, steps, warmup, packing)
        for cap in caps:
            how = prepare(cap, micro_batch * 2048)  # the project's probe runs uncapped, as in the stage
            with capped(cap):
                for workload, (batches, useful) in workloads.items():
                    entry = {"tool": tool, "setting": setting, "cap_gib": cap, "micro_batch": micro_batch,
                             "workload": workload, **how}
                    try:
                        m = measure(model, [adapt(workload, b) for b in batches], variant=setting, workload=workload,
                                    warmup=warmup, useful_tokens=useful)
                        entry.update(useful_tokens_per_s=m.useful_tokens_per_s, tokens_per_s=m.tokens_per_s,
                                     peak_memory_gib=m.peak_memory_gib, losses=m.losses)
                    except torch.OutOfMemoryError:
                        entry.update(useful_tokens_per_s=None, peak_memory_gib=None, out_of_memory=True)
                        release_memory()
                    log.info("%s", {k: v for k, v in entry.items() if k != "losses"})
                    results.append(entry)
    return results


def project_prepare(model: Any) -> Callable[[float, int], dict[str, Any]]:
    def prepare(cap: float, tokens: int) -> dict[str, Any]:
        log.info("cap %g, %d tokens: %.2f GiB allocated before planning", cap, tokens,
                 torch.cuda.memory_allocated() / GIB)
        try:
            budget = MemoryBudget(gib=cap, tokens_per_micro_batch=tokens, plans_layers=True)
            plan = plan_to_budget(model, budget, torch.bfloat16)  # the compute dtype on CUDA
        except (PipelineError, torch.OutOfMemoryError) as error:  # recorded, then measured all-checkpointed
            log.warning("cap %s, %d tokens: %s", cap, tokens, str(error).splitlines()[0])
            release_memory()
            for layer in decoder_layers(model):
                layer.gradient_checkpointing = True
            return {"plan_error": str(error).splitlines()[0]}
        return {"kept_layers": plan.kept_layers, "checkpointed_layers": len(plan.checkpointed_layers),
                "dequantized_layers": plan.dequantized_layers, "absmax_layers": plan.absmax_layers,
                "expected_peak_gib": plan.expected_peak_gib, "fixed_gib": plan.fixed_gib}
    return prepare


@contextlib.contextmanager
def peft_forward(model: Any) -> Iterator[None]:
    """PEFT's own LoRA forward on every layer fuse_lora_layers gave the fused one (an instance attribute)."""
    fused = {module: module.__dict__.pop("forward") for module in model.modules()
             if is_lora_linear(module) and "forward" in module.__dict__}
    try:
        yield
    finally:
        for module, forward in fused.items():
            module.forward = forward


def loss_check(model: Any, caps: list[float], steps: int) -> dict[str, Any]:
    """50 steps of 2 x 2048 dense tokens from the same LoRA init: the reference is PEFT's own LoRA forward with
    every layer checkpointed, against the stage's model (fused LoRA where auto fuses) under each cap's plan; the
    largest loss difference per cap."""
    initial = {name: value.detach().clone() for name, value in model.named_parameters() if value.requires_grad}
    batches, useful = collate(dense_batches(steps, rows=2, length=2048, seed=50), packing=True)
    curves: dict[str, list[float]] = {}
    for label, cap in [("peft_all_checkpointed", None), *[(f"cap_{c:g}", c) for c in caps]]:
        with torch.no_grad():
            for name, value in model.named_parameters():
                if name in initial:
                    value.copy_(initial[name])
        if cap is None:
            for layer in decoder_layers(model):
                layer.gradient_checkpointing = True
        else:
            project_prepare(model)(cap, 2 * 2048)
        with capped(cap or 1e6), (peft_forward(model) if cap is None else contextlib.nullcontext()):
            try:
                curves[label] = measure(model, batches, variant=label, workload="loss_check", warmup=0,
                                        useful_tokens=useful).losses
            except torch.OutOfMemoryError:
                log.warning("loss check %s: out of memory under the plan", label)
                curves[label] = None
    reference = curves.pop("peft_all_checkpointed")
    return {"steps": steps, "reference": "PEFT's LoRA forward, every layer checkpointed",
            "reference_final_loss": reference[-1],
            "max_abs_loss_diff": {label: round(max(abs(a - b) for a, b in zip(reference, curve)), 5)
                                  if curve else "out_of_memory" for label, curve in curves.items()}}


def run_project(model_dir: str, caps: list[float], steps: int, warmup: int, loss_steps: int,
                out: Path) -> dict[str, Any]:
    model, packing = build_variant(model_dir, "project")
    payload: dict[str, Any] = {"device": torch.cuda.get_device_name(0),
                               "activation_headroom": memory_budget.ACTIVATION_HEADROOM,
                               "frozen_linear_params": frozen_linear_params(model.config)}
    if steps:
        payload["results"] = run_grid(model, "project", "memory_budget", caps=caps, steps=steps, warmup=warmup,
                                      packing=packing, prepare=project_prepare(model))
        write(out, payload)  # kept if the loss check runs out of time
    payload["loss_check"] = loss_check(model, caps, loss_steps) if loss_steps else None
    write(out, payload)
    return payload


def best_per_cap(results: list[dict[str, Any]]) -> dict[tuple[str, float, str], dict[str, Any]]:
    best: dict[tuple[str, float, str], dict[str, Any]] = {}
    for entry in results:
        if entry.get("useful_tokens_per_s") is None:
            continue
        key = (entry["tool"], entry["cap_gib"], entry["workload"])
        if key not in best or entry["useful_tokens_per_s"] > best[key]["useful_tokens_per_s"]:
            best[key] = entry
    return best


def summarize(project: dict[str, Any], unsloth: dict[str, Any]) -> dict[str, Any]:
    best = best_per_cap(project["results"] + unsloth["results"])
    params = project["frozen_linear_params"]
    rows = []
    for cap in sorted({entry["cap_gib"] for entry in project["results"]}):
        for workload in ("dense", "alpaca_packed"):
            ours, theirs = best.get(("project", cap, workload)), best.get(("unsloth", cap, workload))
            row: dict[str, Any] = {"cap_gib": cap, "workload": workload}
            for name, entry in (("project", ours), ("unsloth", theirs)):
                if entry:
                    row[name] = {key: entry.get(key) for key in ("setting", "micro_batch", "useful_tokens_per_s",
                                                                 "tokens_per_s", "peak_memory_gib", "kept_layers")}
                    row[name]["mfu_4n"] = round(4 * params * entry["useful_tokens_per_s"] / DENSE_BF16_PEAK_FLOPS, 3)
            if ours and theirs:
                row["project_over_unsloth"] = round(ours["useful_tokens_per_s"] / theirs["useful_tokens_per_s"], 3)
            rows.append(row)
    return {"by_cap": rows, "loss_check": project.get("loss_check")}


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'cap':>5} {'workload':<14} {'project tok/s':>14} {'(mb, kept)':>11} {'peak':>6} "
             f"{'unsloth tok/s':>14} {'(setting, mb)':>22} {'peak':>6} {'ratio':>6}"]
    for row in summary["by_cap"]:
        ours, theirs = row.get("project", {}), row.get("unsloth", {})
        lines.append(f"{row['cap_gib']:>5g} {row['workload']:<14} {ours.get('useful_tokens_per_s', '-')!s:>14} "
                     f"{str((ours.get('micro_batch'), ours.get('kept_layers'))):>11} "
                     f"{ours.get('peak_memory_gib', '-')!s:>6} {theirs.get('useful_tokens_per_s', '-')!s:>14} "
                     f"{str((theirs.get('setting'), theirs.get('micro_batch'))):>22} "
                     f"{theirs.get('peak_memory_gib', '-')!s:>6} {row.get('project_over_unsloth', '-')!s:>6}")
    return "\n".join(lines)


def write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command_line(), **payload}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--caps", default=",".join(f"{cap:g}" for cap in CAPS_GIB))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per grid cell; 0: the loss check only")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loss-steps", type=int, default=50)
    parser.add_argument("--headroom", type=float, default=memory_budget.ACTIVATION_HEADROOM,
                        help="the plan's activation headroom for this run (the stage's constant by default): to "
                             "measure another before changing it")
    parser.add_argument("--summarize", nargs=2, type=Path, metavar=("PROJECT_JSON", "UNSLOTH_JSON"))
    arguments = parser.parse_args()
    configure_logging()
    if arguments.summarize:
        project, unsloth = (json.loads(path.read_text()) for path in arguments.summarize)
        summary = summarize(project, unsloth)
        write(arguments.out, summary)
        print(table(summary))
        return
    caps = [float(cap) for cap in arguments.caps.split(",")]
    memory_budget.ACTIVATION_HEADROOM = arguments.headroom
    run_project(arguments.model_dir, caps, arguments.steps, arguments.warmup, arguments.loss_steps, arguments.out)


if __name__ == "__main__":
    main()
