"""Do two CPUs give the same greedy answers, byte for byte? (issue 11, section 1)

    python -m bench.cpu_determinism prepare DIR         # here: a tiny Mistral trained on the bundled data + LoRA
    python -m bench.cpu_determinism predict DIR OUT      # on each machine (CUDA hidden): predictions + environment
    python -m bench.cpu_determinism compare RESULT A B... # the comparison JSON (bench/results/cpu_determinism.json)

`prepare` builds what can be carried to the GPU machine (its CPU has AVX512-BF16 and AMX): a random-init 4-layer
Mistral-shaped model with Mistral's tokenizer (briefly trained, such a model collapses to repeating one token, whose
answers no kernel could change; a random one has near-tied logits everywhere), a random non-zero LoRA adapter on its
NF4 quantization, and bundled prompts. `predict` answers them four ways: the pipeline's CPU reference path
(alpaca_qlora.models.inference: float64, `plain`), what the evaluate stage runs on CPU (our loop decoding with a float32
copy while float64 decides the near ties: generation/near_ties.py; it must give the float64 answers), and the path
before float64 (bitsandbytes' 4-bit layers in fp32) with and without bitsandbytes' AVX512-BF16 repack, to show what
the float64 path removes.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import random
import sys
from pathlib import Path

import torch

from alpaca_qlora import io
from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.generation import generate

log = logging.getLogger("cpu_determinism")
TEMPLATE = get_template("alpaca")
MAX_NEW_TOKENS = 32
EVAL_ROWS = 64
WEIGHT_SCALE = 4.0
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def prepare(out: Path) -> None:
    """A random-init base (its logits are nearly tied everywhere: the hardest case for determinism) and a LoRA
    adapter with random non-zero weights on its NF4 quantization, plus held-out bundled prompts."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    from alpaca_qlora.data.bundled import generate_rows
    from alpaca_qlora.models.loading import load_model
    from alpaca_qlora.models.quantization import plan_quantization
    from support.mistral import build_tiny_mistral

    rows = generate_rows()
    random.Random(0).shuffle(rows)
    build_tiny_mistral(out / "base", num_hidden_layers=4, hidden_size=64, intermediate_size=192, seed=0)
    # matrices scaled up so the network is far from its near-identity init: answers vary per prompt and a small
    # perturbation spreads (the harshest test)
    base = MistralForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
    with torch.no_grad():
        for parameter in base.parameters():
            if parameter.dim() == 2:
                parameter.mul_(WEIGHT_SCALE)
    base.save_pretrained(str(out / "base"))
    quantized = load_model(str(out / "base"), plan_quantization("nf4", "cpu"), device="cpu")
    torch.manual_seed(1)
    adapter = get_peft_model(quantized, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    adapter.peft_config["default"].base_model_name_or_path = "base"  # `predict` runs inside `out`
    adapter.save_pretrained(str(out / "adapter"))
    io.write_jsonl(out / "eval.jsonl", [{"id": str(index), "prompt": TEMPLATE.render(row["instruction"],
                                                                                       row.get("input", ""))}
                                        for index, row in enumerate(rows[:EVAL_ROWS])])
    log.info("written to %s", out)


def _legacy_load(base_dir: Path, adapter_dir: Path | None, *, repack: bool):
    """The CPU path before float64: bitsandbytes' 4-bit layers, fp32 compute; `repack` leaves bnb's own switch."""
    from peft import PeftModel

    from alpaca_qlora.models.loading import load_model, load_tokenizer
    from alpaca_qlora.models.quantization import plan_quantization

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
    from alpaca_qlora.models.inference import load_for_inference, with_float32_copy

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the adapter names its base "base"
    work = Path(".")
    prompts_rows = io.read_jsonl(work / "eval.jsonl")
    prompts = [row["prompt"] for row in prompts_rows]
    summary = {"environment": environment(), "inputs": {
        name: io.sha256_file(work / name) for name in ("base/model.safetensors", "base/tokenizer.json",
                                                       "adapter/adapter_model.safetensors", "eval.jsonl")},
        "predictions": {}}
    for which in ("base", "finetuned"):
        adapter = work / "adapter" if which == "finetuned" else None
        for path in ("float64", "float32-decodes-float64-decides", "fp32-4bit-no-repack", "fp32-4bit-bnb-default"):
            method, copied = "plain", None
            if path == "float64":
                loaded = load_for_inference("base", "nf4", adapter_dir=adapter, device="cpu")
                model, tokenizer = loaded.model, loaded.tokenizer
                summary.setdefault("numeric_path", loaded.numeric_path)
                summary.setdefault("float64_weights_sha256", {})[which] = _float64_weights_sha256(model)
            elif path.startswith("float32"):  # what the evaluate stage runs on CPU (auto: fast + the float32 copy)
                method, copied = "fast", with_float32_copy(loaded).float32_copy
            else:
                model, tokenizer = _legacy_load(work / "base", adapter, repack=path.endswith("default"))
            generations, stats = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=16,
                                          stop_markers=TEMPLATE.stop_markers, progress=False, method=method,
                                          float32_copy=copied)
            name = f"{which}.{path}"
            rows = [{"id": row["id"], "raw": g.raw, "stopped_by_eos": g.stopped_by_eos, "new_tokens": g.new_tokens}
                    for row, g in zip(prompts_rows, generations, strict=True)]
            text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
            summary["predictions"][name] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "rows": rows,
                                            **{key: value for key, value in stats.items()
                                               if key.startswith("near_tie")}}
            log.info("%s: %s", name, summary["predictions"][name]["sha256"][:16])
    io.write_json(out / "summary.json", summary)


def compare(folders: list[Path], result: Path) -> None:
    """Every run against the first: per prediction set, identical bytes or not, and how many rows differ."""
    runs = {folder.name: io.read_json(folder / "summary.json") for folder in folders}
    reference_name, reference = next(iter(runs.items()))
    comparisons = {}
    for name, run in list(runs.items())[1:]:
        entries = {}
        for key, mine in reference["predictions"].items():
            theirs = run["predictions"][key]
            entries[key] = {"identical_bytes": mine["sha256"] == theirs["sha256"],
                            "rows_differing": sum(x != y for x, y in zip(mine["rows"], theirs["rows"], strict=True)),
                            "rows": len(mine["rows"])}
            log.info("%s vs %s, %-30s identical %s (%d of %d rows differ)", reference_name, name, key,
                     entries[key]["identical_bytes"], entries[key]["rows_differing"], entries[key]["rows"])
        comparisons[f"{reference_name} vs {name}"] = {
            "inputs_identical": run["inputs"] == reference["inputs"],
            "float64_weights_identical": run["float64_weights_sha256"] == reference["float64_weights_sha256"],
            "predictions": entries}
    io.write_json(result, {
        "what": "greedy answers of one model + adapter on several CPUs, CUDA hidden (bench/cpu_determinism.py)",
        "max_new_tokens": MAX_NEW_TOKENS, "inputs": reference["inputs"], "numeric_path": reference["numeric_path"],
        "runs": {name: {"environment": run["environment"], "float64_weights_sha256": run["float64_weights_sha256"],
                        "predictions_sha256": {key: value["sha256"] for key, value in run["predictions"].items()},
                        "float32_decodes_give_float64_answers": {
                            which: run["predictions"][f"{which}.float32-decodes-float64-decides"]["sha256"]
                            == run["predictions"][f"{which}.float64"]["sha256"] for which in ("base", "finetuned")},
                        "near_ties": {key: {k: v for k, v in value.items() if k.startswith("near_tie")}
                                      for key, value in run["predictions"].items() if key.startswith(("base.float32",
                                                                                                      "finetuned.float32"))}}
                 for name, run in runs.items()},
        "comparisons": comparisons})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("dir", type=Path)
    p = sub.add_parser("predict")
    p.add_argument("dir", type=Path)
    p.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("result", type=Path)
    c.add_argument("folders", type=Path, nargs="+", help="runs' output folders; the first is the reference")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dir)
    elif args.command == "predict":
        predict(args.dir, args.out)
    else:
        compare(args.folders, args.result)


if __name__ == "__main__":
    main()
