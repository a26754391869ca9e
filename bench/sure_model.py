"""Agreement of the generation paths with plain `generate()`, judged on a model that is sure of its answers.

A random-init model's logits are near-ties everywhere, so on it any two kernels part ways and "identical to plain"
measures noise. This bench trains a small Mistral-shaped model (GQA, a few layers, the Mistral tokenizer) from
scratch on the bundled data, split, formatted and tokenized as the sample and format stages do, until it answers
confidently; trains a LoRA adapter on it for a few steps; saves both; loads them through the evaluate stage's loader
in NF4 (load_for_inference, adapter attached at runtime); answers the held-out eval rows, and a sample of training
rows (where it is surest), with every generation path; and reports per path the share of rows identical to plain
and EM/F1 from the project's metrics, under `agreement_on_sure_model`.

    python -m bench.sure_model --out OUT/sure_model.json              (GPU: a few minutes)
    python -m bench.sure_model --tiny --out /tmp/sure.json            (CPU, tiny sizes: what the test runs)
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.data.bundled.dataset import generate_rows
from alpaca_qlora.data.formatting import (
    response_token_count,
    row_prompt,
    stop_margin,
    token_limit,
    tokenize_training_rows,
)
from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.data.records import clean_rows
from alpaca_qlora.data.sampling import split_rows
from alpaca_qlora.evaluation.metrics import aggregate
from alpaca_qlora.evaluation.scoring import score_generations
from alpaca_qlora.generation import generate
from alpaca_qlora.models.inference import load_for_inference
from alpaca_qlora.stage import configure_logging
from alpaca_qlora.training.model import attach_lora
from bench import command_line
from bench.eval_variants import VARIANTS, prepare
from bench.train_variants import bench_profile, profile_lora

log = logging.getLogger("sure_model")
# (variant, generation method, base weights, LoRA) from the eval bench, each run on a freshly loaded model and
# prepared by the eval bench's own step; auto and auto_folded are the evaluate stage's preparation and method
PATHS = tuple((name, *VARIANTS[name]) for name in ("plain", "graphed", "graphed_folded", "fast", "graphed_dequantized",
                                                    "graphed_grouped", "auto", "auto_folded", "merged_bf16"))


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    eval_rows: int
    seen_rows: int
    train_rows: int | None  # None: every training row
    batch_rows: int
    train_seconds: float
    max_epochs: int
    lora_steps: int
    learning_rate: float
    max_new_tokens_cap: int
    generation_batch: int


GPU = Size(hidden=768, layers=6, heads=12, kv_heads=4, intermediate=2048, eval_rows=300, seen_rows=200,
           train_rows=None, batch_rows=64, train_seconds=120, max_epochs=60, lora_steps=40, learning_rate=1e-3,
           max_new_tokens_cap=96, generation_batch=128)
TINY = Size(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, eval_rows=6, seen_rows=4, train_rows=48,
            batch_rows=16, train_seconds=30, max_epochs=15, lora_steps=2, learning_rate=1e-2, max_new_tokens_cap=12,
            generation_batch=8)


def bundled_split(size: Size, seed: int = 42) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and held-out rows of the bundled data, drawn as the sample stage draws them."""
    rows, _ = clean_rows(generate_rows())
    split = split_rows(rows, sample_frac=1.0, eval_size=size.eval_rows, seed=seed)
    train = split.train if size.train_rows is None else split.train[: size.train_rows]
    return train, split.eval


def eval_items(rows: list[dict[str, Any]], tokenizer: Any, template: Any) -> list[dict[str, Any]]:
    """The format stage's eval rows: prompt, reference and its token count."""
    return [{"id": row["id"], "task_type": row.get("task_type"), "prompt": row_prompt(template, row),
             "instruction": row["instruction"], "input": row.get("input", ""), "reference": row["output"],
             "reference_tokens": response_token_count(tokenizer, row["output"])} for row in rows]


def build_small_mistral(tokenizer: Any, size: Size) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                           num_hidden_layers=size.layers, num_attention_heads=size.heads,
                           num_key_value_heads=size.kv_heads, max_position_embeddings=4096, sliding_window=None,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    return MistralForCausalLM(config)


def batches(examples: list[dict[str, Any]], batch_rows: int, pad_id: int, rng: random.Random, device: str):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_rows):
        chosen = [examples[index] for index in order[start : start + batch_rows]]
        longest = max(len(example["input_ids"]) for example in chosen)
        ids = torch.full((len(chosen), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(chosen), longest), dtype=torch.long)
        for row, example in enumerate(chosen):
            length = len(example["input_ids"])
            ids[row, :length] = torch.tensor(example["input_ids"])
            labels[row, :length] = torch.tensor(example["labels"])
            mask[row, :length] = 1
        yield ids.to(device), labels.to(device), mask.to(device)


def mean_loss(model: Any, examples: list[dict[str, Any]], size: Size, pad_id: int, device: str) -> float:
    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for ids, labels, mask in batches(examples, size.batch_rows, pad_id, random.Random(0), device):
            losses.append(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item())
    model.train()
    return round(sum(losses) / max(len(losses), 1), 4)


def train(model: Any, examples: list[dict[str, Any]], held_out: list[dict[str, Any]], size: Size, *, pad_id: int,
          device: str, epochs: int, seconds: float, learning_rate: float) -> dict[str, Any]:
    """Plain AdamW (fp32 weights, bf16 autocast on CUDA) for `epochs` or `seconds`, whichever ends first."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / size.batch_rows)
    total = max(1, steps_per_epoch * epochs)
    warmup = max(1, min(20, total // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))))
    rng, started, step, losses = random.Random(0), time.perf_counter(), 0, []
    model.train()
    for epoch in range(epochs):
        for ids, labels, mask in batches(examples, size.batch_rows, pad_id, rng, device):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        log.info("epoch %d: train loss %.4f (%d steps, %.0f s)", epoch + 1, sum(losses[-steps_per_epoch:]) /
                 min(len(losses), steps_per_epoch), step, time.perf_counter() - started)
        if time.perf_counter() - started > seconds:
            break
    return {"steps": step, "epochs": epoch + 1, "seconds": round(time.perf_counter() - started, 1),
            "train_loss": mean_loss(model, examples, size, pad_id, device),
            "held_out_loss": mean_loss(model, held_out, size, pad_id, device)}


def build_sure_model(work: Path, tokenizer: Any, size: Size, device: str) -> dict[str, Any]:
    """Train the base and a LoRA adapter on it; save them under work/base and work/adapter."""
    template = get_template("alpaca")
    train_rows, eval_rows = bundled_split(size)
    examples, _ = tokenize_training_rows(train_rows, tokenizer, template, max_length=512, overlong="truncate")
    held_out, _ = tokenize_training_rows(eval_rows, tokenizer, template, max_length=512, overlong="truncate")
    model = build_small_mistral(tokenizer, size).to(device)
    base = train(model, examples, held_out, size, pad_id=tokenizer.pad_token_id, device=device,
                 epochs=size.max_epochs, seconds=size.train_seconds, learning_rate=size.learning_rate)
    log.info("base: %s", base)
    model.to(torch.bfloat16).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    model = attach_lora(model.float(), profile_lora(), quantized=False, gradient_checkpointing=False)
    model.base_model.model.config._name_or_path = str((work / "base").resolve())
    adapter = train(model, examples, held_out, size, pad_id=tokenizer.pad_token_id, device=device,
                    epochs=max(1, math.ceil(size.lora_steps / math.ceil(len(examples) / size.batch_rows))),
                    seconds=size.train_seconds / 4, learning_rate=size.learning_rate / 2)
    log.info("adapter: %s", adapter)
    model.save_pretrained(work / "adapter")
    del model
    return {"size": asdict(size), "train_rows": len(examples), "eval_rows": len(eval_rows), "base": base,
            "adapter": adapter, "eval": eval_items(eval_rows, tokenizer, template),
            "seen": eval_items(train_rows[: size.seen_rows], tokenizer, template)}


def score(items: list[dict[str, Any]], generations: list[Any], template: Any, max_new_tokens: int) -> dict[str, Any]:
    """EM and F1 through the evaluate stage's own scoring, under the real run's short-answer rule."""
    rows = score_generations(items, generations, template, bench_profile().eval, max_new_tokens)
    overall = aggregate(rows)["overall"]
    return {"exact_match": overall["exact_match"], "f1": overall["f1"], "n_short_answer": overall["n_short_answer"]}


def agreement(work: Path, built: dict[str, Any], size: Size, device: str, paths: list[str]) -> dict[str, Any]:
    """Every path over the NF4 model + adapter, loaded afresh for each; figures per path and row set."""
    template = get_template("alpaca")
    markers = template.stop_markers
    sets = {"eval": built["eval"], "seen": built["seen"]}
    report: dict[str, Any] = {"rows": {name: len(items) for name, items in sets.items()}, "by_path": {}}
    raws_plain: dict[str, list[str]] = {}
    limits: dict[str, int] = {}
    for variant, method, *_ in PATHS:
        if variant not in paths:
            continue
        loaded = load_for_inference(str(work / "base"), "nf4", adapter_dir=work / "adapter", device=device)
        tokenizer = loaded.tokenizer
        if not limits:  # the tokenizer is the same at every load
            limits = {name: token_limit("auto", [item["reference_tokens"] for item in items],
                                        margin=stop_margin(tokenizer, markers),
                                        cap=size.max_new_tokens_cap)["max_new_tokens"]
                      for name, items in sets.items()}
            report["max_new_tokens"] = limits
        weights = prepare(loaded.model, variant, {"weights": "nf4", "lora": "peft"}, loaded.device,
                          dequantized_on_load=bool(loaded.numeric_path))  # CPU: the loader's float64 path
        figures: dict[str, Any] = {"method": method, **({"weights": weights} if weights else {})}
        for name, items in sets.items():
            started = time.perf_counter()
            generations, stats = generate(loaded.model, tokenizer, [item["prompt"] for item in items],
                                          max_new_tokens=limits[name], batch_size=size.generation_batch,
                                          stop_markers=markers, progress=False, method=method)
            raws = [generation.raw for generation in generations]
            raws_plain.setdefault(name, raws)
            same = sum(a == b for a, b in zip(raws_plain[name], raws))
            figures[name] = {**score(items, generations, template, limits[name]), "identical_to_plain": same,
                             "identical_share": round(same / max(len(raws), 1), 4),
                             "stopped_by_eos": sum(g.stopped_by_eos for g in generations),
                             "wall_s": round(time.perf_counter() - started, 2),
                             "new_tokens_per_s": stats["new_tokens_per_s"]}
        report["by_path"][variant] = figures
        log.info("%s: %s", variant, figures)
        del loaded  # before the next path loads its own copy
        if device == "cuda":
            torch.cuda.empty_cache()
    plain = report["by_path"].get("plain")
    for variant, figures in report["by_path"].items():
        if plain is None or variant == "plain":
            continue
        ev, plain_ev = figures["eval"], plain["eval"]
        figures["meets_goal"] = bool(ev["identical_share"] >= 0.99 and
                                     abs((ev["exact_match"] or 0) - (plain_ev["exact_match"] or 0)) <= 0.005 and
                                     abs((ev["f1"] or 0) - (plain_ev["f1"] or 0)) <= 0.005)
    return report


def run(out: Path, size: Size, device: str, paths: list[str], work: Path) -> dict[str, Any]:
    from support.mistral import mistral_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = mistral_tokenizer()
    if tokenizer.pad_token is None:  # as load_tokenizer does for training; padded positions are masked out
        tokenizer.pad_token = tokenizer.eos_token
    built = build_sure_model(work, tokenizer, size, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    payload = {"command": command_line(), "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "torch": torch.__version__,
               "model": {key: built[key] for key in ("size", "train_rows", "eval_rows", "base", "adapter")},
               "agreement_on_sure_model": agreement(work, built, size, device, paths)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sure-model"))
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model and rows (seconds)")
    parser.add_argument("--train-seconds", type=float, help="override the training budget")
    parser.add_argument("--paths", default=",".join(name for name, *_ in PATHS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    arguments = parser.parse_args()
    configure_logging()
    size = TINY if arguments.tiny else GPU
    if arguments.train_seconds is not None:
        size = Size(**{**asdict(size), "train_seconds": arguments.train_seconds})
    payload = run(arguments.out, size, arguments.device, arguments.paths.split(","), arguments.work)
    print(json.dumps({"model": payload["model"]["base"], **payload["agreement_on_sure_model"]}, indent=1))


if __name__ == "__main__":
    main()
