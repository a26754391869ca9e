"""evaluate: answer the held-out prompts with the base model or the fine-tuned one, and score the answers.

`python stages/evaluate.py base` depends only on the base model, the eval prompts and the eval params, so a LoRA
experiment reuses the cached base result; `python stages/evaluate.py finetuned` attaches models/adapter at runtime.
With no argument both run (outside DVC). Outs: data/predictions/<which>.jsonl and metrics/eval_<which>.json.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import _venv_check  # noqa: F401 (first: says to activate the venv when a package is missing)

from alpaca_qlora import io
from alpaca_qlora.data.formatting import stop_margin, token_limit
from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.evaluation.metrics import aggregate
from alpaca_qlora.evaluation.scoring import score_generations
from alpaca_qlora.generation import Generation, generate, prepare_for_generation, resolve_generation_method
from alpaca_qlora.models.inference import LoadedModel, load_for_inference, with_float32_copy
from alpaca_qlora.models.numerics import base_weights_fingerprint, describe_cuda_path
from alpaca_qlora.stage import read_input_rows, run_stage, split_timing, timing_path
from alpaca_qlora.stage_params import StageParams, stage_params

EVAL_IN = Path("data/formatted/eval.jsonl")
ADAPTER = Path("models/adapter")
MODELS = ("base", "finetuned")

log = logging.getLogger("evaluate")


def load_for_eval(which: str, params: StageParams, generation: str) -> tuple[LoadedModel, str, str]:
    """The model the stage answers with (float64 on CPU), the generation method that runs for `generation`, and
    the name of the weights it runs on; a bench passes another `generation` to compare methods."""
    loaded = load_for_inference(params.model.name, params.model.quantization,
                                adapter_dir=ADAPTER if which == "finetuned" else None)
    method = resolve_generation_method(generation, loaded.device, loaded.model)  # auto: see generation
    weights = prepare_for_generation(loaded.model, requested=generation, method=method, device=loaded.device,
                                     quantized=loaded.plan.quantized, dequantized_on_load=bool(loaded.numeric_path),
                                     merge=params.eval.merge_bf16, fold=params.eval.fold_lora)
    return (with_float32_copy(loaded) if method == "fast" else loaded), method, weights


def generation_limit(rows: list[dict[str, Any]], loaded: LoadedModel, params: StageParams) -> dict[str, Any]:
    """The new-token limit (eval.max_new_tokens, auto: covering the references), warning when it cuts them."""
    template = get_template(params.data.template)
    limit = token_limit(params.eval.max_new_tokens, [row["reference_tokens"] for row in rows],
                        margin=stop_margin(loaded.tokenizer, template.stop_markers),
                        cap=params.eval.max_new_tokens_cap)
    if limit["references_over_limit"] > 0.01:
        log.warning("eval.max_new_tokens = %d cuts %.1f%% of the references short (%d would cover 99%%): the "
                    "metrics will partly measure the limit", limit["max_new_tokens"],
                    100 * limit["references_over_limit"], limit["covering_99pct"])
    return limit


def answer(rows: list[dict[str, Any]], loaded: LoadedModel, params: StageParams, *, method: str,
           max_new_tokens: int, batch_size: int | None = None,
           progress: bool = True) -> tuple[list[Generation], dict[str, Any]]:
    """Greedy answers to the rows' prompts, as the stage generates them (`batch_size`: eval.batch_size unless a
    bench compares another)."""
    return generate(loaded.model, loaded.tokenizer, [row["prompt"] for row in rows], max_new_tokens=max_new_tokens,
                    batch_size=batch_size or params.eval.batch_size,
                    stop_markers=get_template(params.data.template).stop_markers, method=method, progress=progress,
                    float32_copy=loaded.float32_copy)


def read_eval_rows() -> list[dict[str, Any]]:
    rows = read_input_rows(EVAL_IN, "format")
    if any("reference_tokens" not in row for row in rows):
        raise PipelineError(f"{EVAL_IN} has no reference token counts (written by an older format stage): rerun "
                            "`dvc repro format` first.")
    return rows


def evaluate(which: str) -> None:
    params = stage_params(f"evaluate_{which}")
    template = get_template(params.data.template)
    rows = read_eval_rows()
    started = time.perf_counter()
    loaded, method, weights = load_for_eval(which, params, params.eval.generation)
    limit = generation_limit(rows, loaded, params)
    max_new_tokens = limit["max_new_tokens"]
    generations, stats = answer(rows, loaded, params, method=method, max_new_tokens=max_new_tokens)
    predictions = score_generations(rows, generations, template, params.eval, max_new_tokens)
    metrics = aggregate(predictions)
    run, timing = split_timing({
        "model": params.model.name,
        "adapter": str(ADAPTER) if which == "finetuned" else None,
        "quantized": loaded.plan.quantized,
        "quantization_reason": loaded.plan.reason,
        "device": loaded.device,
        **limit,
        "batch_size": params.eval.batch_size,
        "generation_requested": params.eval.generation,
        "weights": weights,
        "numeric_path": loaded.numeric_path or describe_cuda_path(loaded.plan.compute_dtype, weights),
        "base_weights_sha256": base_weights_fingerprint(loaded.source),
        "runtime_s": round(time.perf_counter() - started, 2),
        **stats,
    })
    metrics["run"] = run
    io.write_jsonl(Path(f"data/predictions/{which}.jsonl"), predictions)
    io.write_json(timing_path(f"evaluate_{which}"), timing)
    io.write_json(Path(f"metrics/eval_{which}.json"), metrics)
    overall = metrics["overall"]
    log.info("%s: EM %s (strict %s) on %d short-answer rows, F1 %s, verbosity %s, stop rate %s, cut by the "
             "%d-token limit %s, %s new tokens/s", which, overall["exact_match"], overall["exact_match_strict"],
             overall["n_short_answer"], overall["f1"], overall["verbosity"], overall["stop_rate"], max_new_tokens,
             overall["cut_by_limit_rate"], stats["new_tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", choices=MODELS, help="which model to evaluate (default: both)")
    arguments = parser.parse_args()
    for which in [arguments.which] if arguments.which else MODELS:
        evaluate(which)


if __name__ == "__main__":
    run_stage(main)
