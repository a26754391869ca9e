"""Do two CPUs give the same greedy answers, byte for byte? (issue 11, section 1)

    python bench/cpu_determinism.py prepare DIR          # here: a tiny Mistral trained on the bundled data + LoRA
    python bench/cpu_determinism.py predict DIR OUT       # on each machine (CUDA hidden): predictions + environment
    python bench/cpu_determinism.py compare A B RESULT    # the comparison JSON (bench/results/cpu_determinism.json)

`prepare` builds what can be carried to the GPU machine (its CPU has AVX512-BF16 and AMX): a 4-layer Mistral-shaped
model with Mistral's tokenizer, trained briefly on the bundled rows so its answers are not trivial, an NF4 LoRA
adapter trained on top, and held-out prompts. `predict` answers them three ways: the pipeline's CPU path
(alpaca_qlora.inference: float64), and the path before it (bitsandbytes' 4-bit layers in fp32) with and without
bitsandbytes' AVX512-BF16 repack, to show what the float64 path removes.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alpaca_qlora import io  # noqa: E402
from alpaca_qlora.generation import generate  # noqa: E402
from alpaca_qlora.prompts import get_template  # noqa: E402

log = logging.getLogger("cpu_determinism")
TEMPLATE = get_template("alpaca")
MAX_NEW_TOKENS = 48
EVAL_ROWS = 96
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _rows_as_examples(rows, tokenizer, max_length=128):
    from alpaca_qlora.formatting import tokenize_training_rows

    examples, _ = tokenize_training_rows(rows, tokenizer, TEMPLATE, max_length=max_length, overlong="truncate")
    return examples


def _batches(examples, size, rng):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order) - size + 1, size):
        chunk = [examples[i] for i in order[start : start + size]]
        longest = max(len(e["input_ids"]) for e in chunk)
        ids = torch.zeros((size, longest), dtype=torch.long)
        labels = torch.full((size, longest), -100, dtype=torch.long)
        mask = torch.zeros((size, longest), dtype=torch.long)
        for row, example in enumerate(chunk):
            n = len(example["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = (torch.tensor(example["input_ids"]),
                                                           torch.tensor(example["labels"]), 1)
        yield ids, labels, mask


def _train(model, examples, *, steps, lr, seed):
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    done = 0
    while done < steps:
        for ids, labels, mask in _batches(examples, 8, rng):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done % 10 == 0:
                log.info("step %d loss %.3f", done, loss.item())
            if done >= steps:
                break
    return float(loss.item())


def prepare(out: Path) -> None:
    """Tiny base (full training) + LoRA adapter on its NF4 quantization (the pipeline's QLoRA on CPU) + eval rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    from alpaca_qlora.bundled import generate_rows
    from alpaca_qlora.models import build_tiny_mistral, load_model, load_tokenizer, plan_quantization

    rows = [{**row, "id": str(index)} for index, row in enumerate(generate_rows())]
    random.Random(0).shuffle(rows)
    eval_rows, train_rows = rows[:EVAL_ROWS], rows[EVAL_ROWS:]
    base_dir, adapter_dir = out / "base", out / "adapter"
    build_tiny_mistral(base_dir, num_hidden_layers=4, hidden_size=64, intermediate_size=192, seed=0)
    tokenizer = load_tokenizer(str(base_dir))
    examples = _rows_as_examples(train_rows, tokenizer)
    torch.manual_seed(0)
    base = MistralForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base_loss = _train(base, examples, steps=100, lr=3e-3, seed=0)
    base.save_pretrained(str(base_dir))
    plan = plan_quantization("nf4", "cpu")
    quantized = load_model(str(base_dir), plan, device="cpu")
    torch.manual_seed(1)
    peft_model = get_peft_model(quantized, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    adapter_loss = _train(peft_model, examples, steps=30, lr=2e-3, seed=1)
    peft_model.save_pretrained(str(adapter_dir))
    io.write_jsonl(out / "eval.jsonl", [{"id": row["id"], "prompt": TEMPLATE.render(row["instruction"],
                                                                                    row.get("input", ""))}
                                        for row in eval_rows])
    log.info("base loss %.3f, adapter loss %.3f; written to %s", base_loss, adapter_loss, out)


def _legacy_load(base_dir: Path, adapter_dir: Path | None, *, repack: bool):
    """The CPU path before float64: bitsandbytes' 4-bit layers, fp32 compute; `repack` leaves bnb's own switch."""
    from peft import PeftModel

    from alpaca_qlora.models import load_model, load_tokenizer, plan_quantization

    model = load_model(str(base_dir), plan_quantization("nf4", "cpu"), device="cpu")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    if not repack:
        import bitsandbytes

        for module in model.modules():
            if isinstance(module, bitsandbytes.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    model.eval()
    return model, load_tokenizer(str(base_dir), padding_side="left")


def _float64_weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def environment() -> dict:
    import bitsandbytes.functional as bnb_functional

    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    model_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), "unknown")
    return {
        "cpu_model": model_name,
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bitsandbytes_has_avx512bf16": bool(bnb_functional.has_avx512bf16()),
        "cuda_visible": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft",
                                                                          "bitsandbytes")},
        "python": sys.version.split()[0],
    }


def predict(work: Path, out: Path) -> None:
    from alpaca_qlora.inference import load_for_inference

    out.mkdir(parents=True, exist_ok=True)
    prompts_rows = io.read_jsonl(work / "eval.jsonl")
    prompts = [row["prompt"] for row in prompts_rows]
    summary = {"environment": environment(), "inputs": {
        name: io.sha256_file(work / name) for name in ("base/model.safetensors", "base/tokenizer.json",
                                                       "adapter/adapter_model.safetensors", "eval.jsonl")},
        "predictions": {}}
    for which in ("base", "finetuned"):
        adapter = work / "adapter" if which == "finetuned" else None
        for path in ("float64", "fp32-4bit-no-repack", "fp32-4bit-bnb-default"):
            if path == "float64":
                loaded = load_for_inference(str(work / "base"), "nf4", adapter_dir=adapter, device="cpu")
                model, tokenizer = loaded.model, loaded.tokenizer
                summary.setdefault("numeric_path", loaded.numeric_path)
                summary.setdefault("float64_weights_sha256", {})[which] = _float64_weights_sha256(model)
            else:
                model, tokenizer = _legacy_load(work / "base", adapter, repack=path.endswith("default"))
            generations, _ = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=16,
                                      stop_markers=TEMPLATE.stop_markers, progress=False)
            name = f"{which}.{path}.jsonl"
            io.write_jsonl(out / name, [{"id": row["id"], "raw": g.raw, "stopped_by_eos": g.stopped_by_eos,
                                         "new_tokens": g.new_tokens} for row, g in zip(prompts_rows, generations)])
            summary["predictions"][name] = io.sha256_file(out / name)
            log.info("%s: %s", name, summary["predictions"][name][:16])
    io.write_json(out / "summary.json", summary)


def compare(first: Path, second: Path, result: Path) -> None:
    """Per prediction file: identical bytes or not, and how many rows differ."""
    sides = {}
    for folder in (first, second):
        summary = io.read_json(folder / "summary.json")
        sides[folder] = summary
    a, b = sides[first], sides[second]
    comparison = {}
    for name in a["predictions"]:
        rows_a, rows_b = io.read_jsonl(first / name), io.read_jsonl(second / name)
        comparison[name] = {"identical_bytes": a["predictions"][name] == b["predictions"].get(name),
                            "rows": len(rows_a),
                            "rows_differing": sum(x != y for x, y in zip(rows_a, rows_b, strict=True)),
                            "sha256": [a["predictions"][name], b["predictions"].get(name)]}
    io.write_json(result, {"machines": [a["environment"], b["environment"]], "inputs_identical": a["inputs"] == b[
        "inputs"], "inputs": a["inputs"], "float64_weights_identical": a.get("float64_weights_sha256") == b.get(
        "float64_weights_sha256"), "float64_weights_sha256": [a.get("float64_weights_sha256"),
                                                              b.get("float64_weights_sha256")],
        "numeric_path": a.get("numeric_path"), "max_new_tokens": MAX_NEW_TOKENS, "comparison": comparison})
    for name, entry in comparison.items():
        log.info("%-36s identical %s (%d of %d rows differ)", name, entry["identical_bytes"], entry["rows_differing"],
                 entry["rows"])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("dir", type=Path)
    p = sub.add_parser("predict")
    p.add_argument("dir", type=Path)
    p.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    for name in ("first", "second", "result"):
        c.add_argument(name, type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dir)
    elif args.command == "predict":
        predict(args.dir, args.out)
    else:
        compare(args.first, args.second, args.result)


if __name__ == "__main__":
    main()
