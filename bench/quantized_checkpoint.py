"""A random-init Mistral-architecture checkpoint written already in NF4, one decoder layer at a time: a 70B shape
never exists whole in any memory, and loading it skips quantization (bitsandbytes' pre-quantized format, the keys
`Linear4bit` saves: the packed weight and its quant_state tensors).

    python -m bench.quantized_checkpoint OUT_DIR [--shape llama2-70b] [--layers N]
    python -m bench.quantized_checkpoint OUT_DIR --subset-of FULL_DIR --layers N   # the first N layers, by links

Each layer is its own safetensors file, so a checkpoint of fewer layers is links to the first N files, an index and
a config. The 4-bit weights are stored in bf16-typed tensors (`bnb_4bit_quant_storage`), as the train stage loads
them for FSDP.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from alpaca_qlora.models.quantization import QuantizationPlan, bnb_config
from alpaca_qlora.stage import configure_logging
from support.mistral import MISTRAL_7B_SHAPE, mistral_7b_config, mistral_tokenizer

log = logging.getLogger("quantized_checkpoint")
# Llama-2-70B's shape; its vocabulary has the 32000 ids of Mistral's tokenizer, which this checkpoint uses.
SHAPES = {"mistral-7b": MISTRAL_7B_SHAPE,
          "llama2-70b": {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
                         "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000}}
INDEX = "model.safetensors.index.json"
HEAD_FILE = "model-head.safetensors"


def layer_file(index: int) -> str:
    return f"model-layer-{index:03d}.safetensors"


def quantized_layer(config: Any, index: int, device: str) -> dict[str, torch.Tensor]:
    """Decoder layer `index`, random, every linear weight in NF4 as `Linear4bit` would save it (on the CPU)."""
    import bitsandbytes.functional as bnb_functional
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    with torch.device(device):
        layer = MistralDecoderLayer(config, index).to(torch.bfloat16)
    tensors: dict[str, torch.Tensor] = {}
    prefix = f"model.layers.{index}."
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            packed, state = bnb_functional.quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True,
                                                         quant_type="nf4", quant_storage=torch.bfloat16)
            tensors[f"{prefix}{name}.weight"] = packed
            tensors.update({f"{prefix}{name}.weight.{key}": value
                            for key, value in state.as_dict(packed=True).items()})
        elif hasattr(module, "weight") and not list(module.children()):
            tensors[f"{prefix}{name}.weight"] = module.weight.data  # the norms, in bf16
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def head(config: Any, device: str) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and output projection: random bf16, as Mistral keeps them unquantized."""
    generator = torch.Generator(device).manual_seed(0)
    shape = (config.vocab_size, config.hidden_size)
    return {name: tensor.cpu() for name, tensor in {
        "model.embed_tokens.weight": torch.randn(shape, generator=generator, device=device) * 0.02,
        "lm_head.weight": torch.randn(shape, generator=generator, device=device) * 0.02,
        "model.norm.weight": torch.ones(config.hidden_size, device=device)}.items()}


def write_config(out_dir: Path, config: Any, layers: int, weight_map: dict[str, str]) -> None:
    plan = QuantizationPlan(quantized=True, reason="pre-quantized", compute_dtype=torch.bfloat16)
    config.num_hidden_layers = layers
    config.quantization_config = bnb_config(plan, shardable=True).to_dict()
    config.save_pretrained(str(out_dir))
    (out_dir / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def write(out_dir: Path, shape: str, layers: int | None, device: str) -> None:
    tokenizer = mistral_tokenizer()
    overrides = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    config = mistral_7b_config(**overrides, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.dtype = torch.bfloat16
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weight_map: dict[str, str] = {}
    for index in range(config.num_hidden_layers):
        tensors = quantized_layer(config, index, device)
        save_file(tensors, str(out_dir / layer_file(index)), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, layer_file(index)))
    tensors = head(config, device)
    save_file(tensors, str(out_dir / HEAD_FILE), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, HEAD_FILE))
    write_config(out_dir, config, config.num_hidden_layers, weight_map)
    tokenizer.save_pretrained(str(out_dir))


def subset(out_dir: Path, full_dir: Path, layers: int) -> None:
    """The first `layers` decoder layers of a checkpoint `write` made, as links to its files."""
    from transformers import AutoConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    kept = {HEAD_FILE, *(layer_file(index) for index in range(layers))}
    for name in kept | {path.name for path in full_dir.iterdir() if path.suffix != ".safetensors"} - {INDEX}:
        if name not in ("config.json",) and not (out_dir / name).exists():
            (out_dir / name).symlink_to((full_dir / name).resolve())
    weight_map = {key: file for key, file in json.loads((full_dir / INDEX).read_text())["weight_map"].items()
                  if file in kept}
    config = AutoConfig.from_pretrained(str(full_dir))
    del config.quantization_config  # written again from the project's own bnb_config
    write_config(out_dir, config, layers, weight_map)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-70b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--subset-of", type=Path, help="link the first --layers layers of this checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    arguments = parser.parse_args()
    configure_logging()
    started = time.perf_counter()
    if arguments.subset_of:
        if not arguments.layers:
            parser.error("--subset-of needs --layers")
        subset(arguments.out_dir, arguments.subset_of, arguments.layers)
    else:
        write(arguments.out_dir, arguments.shape, arguments.layers, arguments.device)
    log.info("%s written in %.0f s", arguments.out_dir, time.perf_counter() - started)


if __name__ == "__main__":
    main()
