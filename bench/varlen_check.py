"""Packed rows under the varlen attention kernel against each row alone, and against sdpa's block-diagonal mask
(logits and LoRA-free input gradients), on a small random Mistral in bf16 on the GPU.

    python -m bench.varlen_check --out bench/results/varlen_check_h200.json
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM

from alpaca_qlora.training.packing import PackedCollator, use_varlen_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=1000, attn_implementation="sdpa")
    model = MistralForCausalLM(config).to("cuda", torch.bfloat16).eval()
    rng = random.Random(0)
    bins = [[{"input_ids": [rng.randrange(3, 1000) for _ in range(length)], "labels": [-100] * length}
             for length in lengths] for lengths in ([300, 200, 24], [511, 1], [512])]
    batch = {key: value.cuda() for key, value in PackedCollator()(bins).items()}
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    logits = {}
    for name in ("sdpa", "varlen"):
        if name == "varlen":
            use_varlen_attention(model)
        embeddings = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        out = model(inputs_embeds=embeddings, position_ids=batch["position_ids"], use_cache=False).logits
        out.float().square().mean().backward()
        logits[name] = (out.detach().float(), embeddings.grad.float())
    alone_diff = 0.0
    with torch.no_grad():
        for index, group in enumerate(bins):
            start = 0
            for row in group:
                alone = model(input_ids=torch.tensor([row["input_ids"]], device="cuda")).logits[0].float()
                packed = logits["varlen"][0][index, start : start + len(alone)]
                alone_diff = max(alone_diff, (packed - alone).abs().max().item())
                start += len(alone)
    result["varlen_vs_rows_alone_max_abs_logit_diff"] = alone_diff
    result["varlen_vs_sdpa_max_abs_logit_diff"] = (logits["varlen"][0] - logits["sdpa"][0]).abs().max().item()
    result["varlen_vs_sdpa_max_abs_grad_diff"] = (logits["varlen"][1] - logits["sdpa"][1]).abs().max().item()
    result["logit_scale"] = logits["sdpa"][0].abs().max().item()
    print(json.dumps(result))
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
