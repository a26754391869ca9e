"""One loader for train, evaluate and inference, so the model and tokenizer are the same everywhere.

`model.name` is a hub id (the real profile: mistralai/Mistral-7B-Instruct-v0.2), a local model directory, or
`embedded:smollm2-135m-instruct` (alpaca_qlora/models/embedded.py converts it once into the model cache).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.embedded import CONVERSION_MARKER, EMBEDDED_SMOLLM2, embedded_model_dir
from alpaca_qlora.models.quantization import QuantizationPlan, bnb_config

log = logging.getLogger(__name__)


# --- which model -----------------------------------------------------------------------------------------------------


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


# --- model ---------------------------------------------------------------------------------------------------------


def _device_map(device: str) -> dict[str, Any]:
    """Load straight onto the device: a 7B in bf16 should not pass through host memory first."""
    target = torch.device(device)
    if target.type == "cuda":
        return {"": target.index if target.index is not None else torch.cuda.current_device()}
    return {"": str(target)}


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
    """The base causal LM as the plan says; k-bit training preparation is left to the train stage.

    `shardable` (FSDP): the 4-bit weights are stored in compute-dtype tensors so FSDP can shard them, and the model
    is staged in host memory: FSDP's `fully_shard` then moves one unit (decoder layer) at a time to the GPU and keeps
    only this process's shard of it there, so no GPU ever holds the whole base.
    """
    from transformers import AutoModelForCausalLM

    # No attn_implementation: transformers' default is sdpa, and eager for an architecture sdpa cannot run
    # (Gemma 2 soft-caps its attention logits); asking for sdpa there is an error.
    kwargs: dict[str, Any] = {"dtype": plan.compute_dtype, "device_map": _device_map("cpu" if shardable else device)}
    if plan.quantized:
        kwargs["quantization_config"] = bnb_config(plan, shardable=shardable)
    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise _load_error(source, error) from error
    except SafetensorError as error:
        raise _damaged_weights_error(source, error) from error
    log.info("loaded %s (%s, %s, %s attention) in %.1f s%s", source, "NF4" if plan.quantized else "unquantized",
             str(plan.compute_dtype).removeprefix("torch."), model.config._attn_implementation,
             time.perf_counter() - started,
             ", staged in host memory for FSDP" if shardable else "")
    if shardable:
        # accelerate refuses a 4-bit model whose device map differs from the training device; this one's "cpu" is
        # only where it waits for fully_shard, so there is no map to check.
        model.__dict__.pop("hf_device_map", None)
    return model
