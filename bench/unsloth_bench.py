"""Unsloth on train_bench's workloads: the anchor the speed issue names, measured in its own process (Unsloth patches
transformers, PEFT and TRL when imported) on the same machine, in the same call, as train_bench's baseline.

    python -m bench.train_bench /tmp/mistral-7b-random --out OUT/train_bench.json --steps 48
    PYTHONPATH=/tmp/unsloth-site:$PYTHONPATH python -m bench.unsloth_bench /tmp/mistral-7b-random \
        --baseline OUT/train_bench.json --out OUT/unsloth_bench.json --steps 48

Same model directory, same batches (train_bench.workloads), same step
(train_bench.measure: bf16 autocast, AdamW, lr 1e-4). Unsloth as its docs show it: FastLanguageModel in NF4,
LoRA r=16, alpha 16 on the seven projections, use_gradient_checkpointing="unsloth"; lora_dropout as the baseline's
(0.05) and, as Unsloth recommends for speed, 0. Alpaca-length rows go in two ways: padded micro-batches of 8, like the
baseline's, and Unsloth's own packing as TRL's SFTTrainer feeds it (`packing=True`, padding-free): the project's
best-fit-decreasing 2048-token bins, 4 per micro-batch, flattened into one row with position ids restarting per
document and `packed_seq_lengths` (what Unsloth's collator wrapper adds), so its varlen attention keeps documents
apart. Ratios are against the baseline JSON's figures; prints a table last. `--profile PATH`: LoRA rank, alpha and
targets from that profile instead of the Mistral one (a family's, as its train_bench run took).
"""
from __future__ import annotations

# isort: off
import unsloth  # noqa: F401  (first: it patches the libraries below)
from unsloth import FastLanguageModel

# isort: on
import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from alpaca_qlora.stage import configure_logging  # noqa: E402
from bench import command_line  # noqa: E402
from bench.budget_bench import run_grid  # noqa: E402
from bench.train_bench import measure  # noqa: E402
from bench.train_results import Measurement  # noqa: E402
from bench.train_variants import (  # noqa: E402
    REFERENCE_LORA_DROPOUT,
    add_profile_argument,
    profile_lora,
    release_memory,
    target_names,
    use_profile,
)
from bench.workloads import alpaca_micro_batches, collate, workloads  # noqa: E402

log = logging.getLogger("unsloth_bench")


def unsloth_model(model_dir: str, dropout: float, checkpointing: str | bool = "unsloth") -> Any:
    lora = profile_lora()
    model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=2048, dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    return FastLanguageModel.get_peft_model(model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=dropout,
                                            target_modules=target_names(lora, model.config), bias="none",
                                            use_gradient_checkpointing=checkpointing, random_state=0)


def padding_free(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A micro-batch of packed bins as TRL's padding-free collator hands it to Unsloth: one row, positions restarting
    per document, the documents' lengths in `packed_seq_lengths`, no attention mask."""
    flat = {name: batch[name].reshape(1, -1) for name in ("input_ids", "labels", "position_ids")}
    starts = (flat["position_ids"][0] == 0).nonzero().flatten().tolist() + [flat["input_ids"].shape[1]]
    flat["packed_seq_lengths"] = torch.tensor([end - start for start, end in zip(starts, starts[1:])],
                                              dtype=torch.int32)
    return flat


def run(model_dir: str, steps: int, warmup: int, dropouts: list[float],
        checkpointing: list[str]) -> list[Measurement]:
    dense_rows, alpaca_length_rows = workloads(steps, warmup)
    dense, dense_useful = collate(dense_rows, packing=False)
    alpaca, alpaca_useful = collate(alpaca_micro_batches(alpaca_length_rows, False, steps + warmup),
                                    packing=False)
    packed, packed_useful = collate(alpaca_micro_batches(alpaca_length_rows, True, steps + warmup), packing=True)
    packed = [padding_free(batch) for batch in packed]
    results = []
    for setting, dropout in [(setting, dropout) for setting in checkpointing for dropout in dropouts]:
        variant = f"unsloth{'' if setting == 'unsloth' else '_nockpt'}_dropout{dropout:g}"
        log.info("variant %s: loading", variant)
        model = unsloth_model(model_dir, dropout, setting if setting == "unsloth" else False)
        results.append(measure(model, dense, variant=variant, workload="dense_4x2048", warmup=warmup,
                               useful_tokens=dense_useful))
        log.info("%s", results[-1])
        results.append(measure(model, alpaca, variant=variant, workload="alpaca_padded_8rows", warmup=warmup,
                               useful_tokens=alpaca_useful))
        log.info("%s", results[-1])
        results.append(measure(model, packed, variant=variant, workload="alpaca_packed_32rows", warmup=warmup,
                               useful_tokens=packed_useful))
        log.info("%s", results[-1])
        del model
        release_memory()
    return results


def run_caps(model_dir: str, caps: list[float], steps: int, warmup: int,
             written: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Unsloth's candidates under each cap (budget_bench's grid): its offloaded checkpointing and no checkpointing,
    dropout 0, micro-batches of 1, 2 and 4 x 2048 tokens; Alpaca-length rows through its own padding-free packing.
    `written` gets the results after each checkpointing setting, so a run cut short keeps the settings it
    finished."""
    results = []
    for checkpointing, setting in (("unsloth", "offloaded_checkpointing"), (False, "no_checkpointing")):
        model = unsloth_model(model_dir, 0.0, checkpointing)
        results += run_grid(model, "unsloth", setting, caps=caps, steps=steps, warmup=warmup, packing=False,
                            prepare=lambda cap, tokens: {},
                            adapt=lambda workload, batch: padding_free(batch) if workload == "alpaca_packed" else batch)
        del model
        release_memory()
        written({"results": results})
    return {"results": results}


def ratios(results: list[Measurement], baseline: dict[str, Any]) -> dict[str, Any]:
    """Useful tokens/s and peak memory against train_bench's baseline and project on the same workload; for
    Alpaca-length rows, Unsloth's better setup (padded or its own packing), named under `alpaca_setup`."""
    by_source = {(entry["variant"], entry["workload"].split("_")[0]): entry for entry in baseline["results"]}
    best: dict[tuple[str, str], Measurement] = {}
    for m in results:
        key = (m.variant, m.workload.split("_")[0])
        if key not in best or m.useful_tokens_per_s > best[key].useful_tokens_per_s:
            best[key] = m
    out: dict[str, Any] = {}
    for (variant, workload), m in best.items():
        entry = out.setdefault(variant, {})
        if workload == "alpaca":
            entry["alpaca_setup"] = m.workload
        for source in ("baseline", "project"):
            other = by_source.get((source, workload))
            if other:
                speed = m.useful_tokens_per_s / other["useful_tokens_per_s"]
                entry[f"{workload}_useful_tokens_vs_{source}"] = round(speed, 3)
                entry[f"{workload}_peak_memory_vs_{source}"] = round(m.peak_memory_gib / other["peak_memory_gib"], 3)
        base_dense = by_source.get(("baseline", "dense"))
        if workload == "dense" and base_dense:
            differences = [abs(a - b) for a, b in zip(base_dense["losses"], m.losses)]
            entry["dense_loss_max_abs_diff_vs_baseline"] = round(max(differences), 4)
    return out


def goal_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """What the speed issue reads (Unsloth over project): Unsloth's fastest variant per workload family."""
    figures: dict[str, Any] = {}
    for key in ("dense_useful_tokens_vs_project", "alpaca_useful_tokens_vs_project"):
        candidates = [(values[key], variant) for variant, values in summary.items() if key in values]
        if candidates:
            value, variant = max(candidates)
            figures[key], figures[key.replace("_vs_project", "_unsloth_variant")] = value, variant
            if key.startswith("dense"):
                figures["dense_peak_memory_vs_project"] = summary[variant]["dense_peak_memory_vs_project"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--baseline", type=Path, help="train_bench.py's JSON from the same call")
    parser.add_argument("--caps", help="budget_bench's grid under these caps (GiB, comma-separated) instead")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dropouts", default=f"{REFERENCE_LORA_DROPOUT:g},0")
    parser.add_argument("--checkpointing", default="unsloth",
                        help="with --baseline, comma-separated: unsloth (its offloaded checkpointing), none")
    add_profile_argument(parser)
    arguments = parser.parse_args()
    configure_logging()
    use_profile(arguments.profile)
    if arguments.caps:
        def written(payload: dict[str, Any]) -> None:
            arguments.out.write_text(json.dumps({"command": command_line(), "device": torch.cuda.get_device_name(0),
                                                 "unsloth": getattr(unsloth, "__version__", "?"), **payload},
                                                indent=2))

        run_caps(arguments.model_dir, [float(cap) for cap in arguments.caps.split(",")], arguments.steps,
                 arguments.warmup, written)
        return
    if arguments.baseline is None:
        parser.error("--baseline is needed without --caps")
    if not set(arguments.checkpointing.split(",")) <= {"unsloth", "none"}:
        parser.error(f"--checkpointing {arguments.checkpointing}: a comma-separated list of unsloth and none")
    baseline = json.loads(arguments.baseline.read_text())
    results = run(arguments.model_dir, arguments.steps, arguments.warmup,
                  [float(value) for value in arguments.dropouts.split(",")], arguments.checkpointing.split(","))
    summary = ratios(results, baseline)
    payload = {"command": command_line(), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "unsloth": getattr(unsloth, "__version__", "?"), "baseline_command": baseline["command"],
               **goal_figures(summary), "ratios": summary, "results": [m.__dict__ for m in results]}
    arguments.out.write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"{'variant':<22} {'workload':<22} {'step s':>8} {'useful tok/s':>13} {'peak GiB':>9}"]
    for m in results:
        lines.append(f"{m.variant:<22} {m.workload:<22} {m.step_time_s:>8.3f} {m.useful_tokens_per_s:>13.0f} "
                     f"{m.peak_memory_gib:>9.2f}")
    lines += [f"{variant}: {values}" for variant, values in summary.items()]
    lines.append(f"goal (Unsloth over project): {goal_figures(summary)}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
