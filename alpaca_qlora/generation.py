"""Batched greedy generation for evaluation and inference, with the prompt ids training used.

Rows are sorted by prompt length so each batch pads little; padding is on the left so every row's next token
comes right after its prompt. Generation stops at EOS, or once a row starts a new `### ` section header (the
model has finished its answer and begun inventing the next prompt).

Three ways to run the same greedy decoding (`generate(..., method=...)`):
- `plain`: `model.generate()` as transformers ships it; finished rows stay in the batch, fed padding.
- `fast`: our own greedy loop (`greedy_generate`) with transformers' DynamicCache that drops each row from the
  batch and from the KV cache as soon as it finishes; the model calls, position ids, masks and stopping rules are
  the ones `generate()` uses, so the tokens are the same (tested against `generate()` on CPU). Combined with
  `dequantize_for_generation` on CUDA (bitsandbytes' own batched 4-bit matmul is dequantize + F.linear, done here
  once instead of every step).
- `graphed`: the same model calls as `plain` with the 4-bit layers untouched, but the decoding step runs over a
  preallocated KV cache (`StaticKVCache`) with fixed shapes, so on CUDA it is captured once per batch in a CUDA
  graph and replayed: one launch per token instead of thousands of kernel launches from Python. Rows stay in the
  batch (as in `plain`); stops are checked every few steps. The cache's unused tail is masked out, so attention
  sees the keys `plain` sees, but over a longer range, for which sdpa may pick another kernel: on GPU near-tie
  argmaxes can flip (bench/results/attention_identity_h200.json). On CPU the same step runs eagerly and gives
  `generate()`'s tokens (tested).
`merge_lora_for_generation` folds LoRA into the dequantized weights: that rounds base + delta to the compute dtype
once, which changes the weights' precision; it is an explicit option whose results differ from the 4-bit path.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.formatting import encode_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    raw: str
    stopped_by_eos: bool
    new_tokens: int


class StopOnMarker(StoppingCriteria):
    """Per-row stop once the generated text contains a stop marker at the start of a line."""

    def __init__(self, tokenizer: Any, prompt_length: int, markers: Sequence[str]):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length
        self.line_markers = tuple("\n" + marker.rstrip() for marker in markers)
        self.start_markers = tuple(marker.rstrip() for marker in markers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length :]
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        done = [text.lstrip().startswith(self.start_markers) or any(m in text for m in self.line_markers)
                for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids) :] = 1
    return input_ids, attention_mask


def split_generated(new_ids: Sequence[int], eos_token_id: int, pad_token_id: int) -> tuple[list[int], bool]:
    """The tokens a row really generated (up to EOS) and whether EOS ended it."""
    ids = list(new_ids)
    if eos_token_id in ids:
        return ids[: ids.index(eos_token_id)], True
    while ids and ids[-1] == pad_token_id:  # rows stopped by a marker are padded to the batch's length
        ids.pop()
    return ids, False


GENERATION_METHODS = ("plain", "fast", "graphed")
# Generation-config settings that add logits processors or stopping rules to greedy `generate()`; our own loop
# applies none of them, so it refuses a model whose generation config sets any (the plain path still works).
_PROCESSOR_SETTINGS = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False), "stop_strings": (None,), "max_time": (None,), "token_healing": (None, False),
}


def greedy_loop_blockers(model: Any) -> list[str]:
    """Generation-config settings under which `greedy_generate` would not reproduce greedy `generate()`."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    return [f"{name}={getattr(config, name)!r}" for name, allowed in _PROCESSOR_SETTINGS.items()
            if getattr(config, name, None) not in allowed]


def resolve_generation_method(requested: str) -> str:
    """Only an explicit choice: `graphed` (3.1x `plain` on an H200) and `fast` (2.5x) give greedy outputs that are
    not bitwise `generate()`'s there (near-tie logits of a random-init 7B flip under other kernels; see
    bench/results/eval_bench_h200.json), so neither is picked for the user."""
    if requested not in GENERATION_METHODS:
        raise PipelineError(f"generation method {requested!r}: use one of {', '.join(GENERATION_METHODS)}.")
    return requested


# --- weights for generation ----------------------------------------------------------------------------------------


class DequantizedLinear(torch.nn.Linear):
    """A bitsandbytes Linear4bit's weights dequantized once: the forward bnb runs for a batch of rows, minus the
    per-call dequantization (inputs cast to the compute dtype, F.linear, result cast back like Linear4bit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def _linear4bit_class() -> type | None:
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes.nn.Linear4bit


def dequantize_linear4bit(layer: Any) -> DequantizedLinear:
    """The plain linear equivalent of one bnb Linear4bit: weight = dequantize_4bit(packed, quant_state), in the
    layer's compute dtype, exactly as bnb's gemm_4bit fallback (dequantize + F.linear) builds it every call."""
    import bitsandbytes.functional as bnb_functional

    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bnb repacks weights for its AVX512-BF16 CPU kernel at the first eval-mode forward (computing in bf16)
        raise PipelineError("dequantize_for_generation must run before the model's first forward on CPU: bitsandbytes "
                            "has repacked this layer for its AVX512-BF16 kernel.")
    weight = bnb_functional.dequantize_4bit(layer.weight.data, state)
    dtype = layer.compute_dtype or state.dtype
    with torch.device("meta"):
        linear = DequantizedLinear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    linear.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
    linear.train(layer.training)
    return linear


def dequantize_for_generation(model: Any) -> int:
    """Replace every bitsandbytes Linear4bit (also the base layer inside PEFT LoRA layers, whose adapters stay
    unmerged) by a DequantizedLinear; returns how many were replaced. Costs the weights in the compute dtype
    (14.5 GB for a 7B in bf16) and saves a dequantization of every weight at every decoding step."""
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, linear4bit):
                setattr(module, name, dequantize_linear4bit(child))
                replaced += 1
    if replaced:
        log.info("dequantized %d 4-bit linear layers for generation", replaced)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return replaced


def merge_lora_for_generation(model: Any) -> int:
    """Fold every LoRA adapter into its (dequantized or full-precision) base weight, in the base weight's dtype.

    Changes precision: base + scaling * B @ A is rounded to bf16 (on CUDA) once, where the 4-bit path adds the
    adapter's output at every call. Run dequantize_for_generation first on a 4-bit model. Returns the count."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    linear4bit = _linear4bit_class()
    merged = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, LoraLayer):
                continue
            base = child.get_base_layer()
            if linear4bit is not None and isinstance(base, linear4bit):
                raise PipelineError("merge_lora_for_generation needs dequantized base weights: "
                                    "call dequantize_for_generation first.")
            if not isinstance(base, torch.nn.Linear):
                raise PipelineError(f"cannot merge LoRA into a {type(base).__name__} ({name}).")
            weight = base.weight.data.float()
            for adapter in child.active_adapters:
                if adapter not in child.lora_A:
                    continue
                if getattr(child, "use_dora", {}).get(adapter) or adapter in getattr(child, "lora_variant", {}):
                    raise PipelineError("merging for generation supports plain LoRA only (not DoRA or variants).")
                delta = child.lora_B[adapter].weight.data.float() @ child.lora_A[adapter].weight.data.float()
                weight = weight + delta * child.scaling[adapter]
            base.weight = torch.nn.Parameter(weight.to(base.weight.dtype), requires_grad=False)
            setattr(module, name, base)
            merged += 1
    if merged:
        log.info("merged %d LoRA layers into the base weights for generation", merged)
    return merged


def describe_weights(model: Any, *, quantized: bool, dequantized: bool, merged: bool) -> str:
    """What the generating weights are, for the metrics: nf4, nf4-dequantized-bf16, merged-bf16, unquantized-fp32."""
    dtype = str(getattr(model, "dtype", None) or next(model.parameters()).dtype).removeprefix("torch.")
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    if merged:
        return f"merged-{dtype}"
    if quantized:
        return f"nf4-dequantized-{dtype}" if dequantized else "nf4"
    return f"unquantized-{dtype}"


# --- our greedy loop -------------------------------------------------------------------------------------------


_TRIGGER_CACHE: dict[tuple[int, int, str], frozenset[int]] = {}


def _trigger_ids(tokenizer: Any, chars: str) -> frozenset[int]:
    """Ids whose own text holds one of `chars` (decoding the vocabulary once per tokenizer: ~0.3 s)."""
    key = (id(tokenizer), len(tokenizer), chars)
    if key not in _TRIGGER_CACHE:
        pieces = tokenizer.batch_decode([[index] for index in range(len(tokenizer))], skip_special_tokens=True)
        _TRIGGER_CACHE[key] = frozenset(index for index, text in enumerate(pieces) if any(c in text for c in chars))
    return _TRIGGER_CACHE[key]


class MarkerCheck:
    """StopOnMarker's rule for one row's generated ids, decoding only rows that could contain a marker.

    A marker such as "###" can only appear once a token whose own text holds its first character ("#") has been
    generated; for ASCII characters that holds for byte-level BPE and sentencepiece byte fallback alike, so rows
    without such a token are skipped without decoding (exactly the same decisions as decoding every row)."""

    def __init__(self, tokenizer: Any, markers: Sequence[str]):
        self.tokenizer = tokenizer
        self.line_markers = tuple("\n" + marker.rstrip() for marker in markers)
        self.start_markers = tuple(marker.rstrip() for marker in markers)
        firsts = {marker.strip()[0] for marker in markers if marker.strip()}
        self.trigger_ids: frozenset[int] | None = None
        if not markers:
            self.trigger_ids = frozenset()
        elif all(char.isascii() for char in firsts) and all(m.strip() for m in markers):
            self.trigger_ids = _trigger_ids(tokenizer, "".join(sorted(firsts)))

    def triggered_by(self, token: int) -> bool:
        return self.trigger_ids is None or token in self.trigger_ids

    def hit(self, generated: Sequence[int]) -> bool:
        if not self.start_markers:
            return False
        text = self.tokenizer.decode(list(generated), skip_special_tokens=True)
        return text.lstrip().startswith(self.start_markers) or any(m in text for m in self.line_markers)


def take_token(generated: list[int], token: int, *, watched: bool, eos_token_id: int, max_new_tokens: int,
               marker_check: MarkerCheck | None) -> tuple[bool, bool]:
    """Append one greedy token to a row; returns (row finished, row watched). A row is watched once it generated a
    token that may start a stop marker; only watched rows are decoded to look for one."""
    generated.append(token)
    done = token == eos_token_id or len(generated) >= max_new_tokens
    if not done and marker_check is not None:
        watched = watched or marker_check.triggered_by(token)
        done = watched and marker_check.hit(generated)
    return done, watched


def _greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's next token as greedy `generate()` picks it: argmax of the last position's logits in fp32."""
    return logits[:, -1].to(dtype=torch.float32).argmax(dim=-1)


def _prefill_inputs(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids of a left-padded batch, and the mask as `generate()` passes it (none when nothing is padded)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    return position_ids, (attention_mask if not bool(attention_mask.all()) else None)


def _forward_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected): what `generate()` itself calls."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@torch.inference_mode()
def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    marker_check: MarkerCheck | None = None,
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch, dropping rows from the batch and the KV cache as they finish.

    Returns each row's new ids, ending with EOS when EOS stopped it. Calls the model as transformers 5's greedy
    `generate()` does (DynamicCache, position ids from the mask, mask dropped when there is no padding, logits of
    the last position only, argmax of fp32 logits), so rows get the tokens `generate()` gives them.
    """
    from transformers import DynamicCache

    network = _forward_model(model)
    device = input_ids.device
    position_ids, mask = _prefill_inputs(attention_mask)
    cache = DynamicCache(config=network.config)
    rows = list(range(input_ids.shape[0]))  # original row index of each batch position
    padded = [not bool(attention_mask[row].all()) for row in rows]
    generated: list[list[int]] = [[] for _ in rows]
    watched = [False] * len(rows)  # a row that generated a marker's first character: decode it every step
    finished = [False] * len(rows)
    step_ids, step_positions = input_ids, position_ids
    for step in range(max_new_tokens):
        outputs = network(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                          past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True)
        cache = outputs.past_key_values
        next_tokens = _greedy_tokens(outputs.logits)
        del outputs
        tokens = next_tokens.tolist()
        keep: list[int] = []
        for position, (row, token) in enumerate(zip(rows, tokens)):
            if finished[row]:  # a row kept only so the mask keeps padding (see below)
                continue
            done, watched[row] = take_token(generated[row], token, watched=watched[row], eos_token_id=eos_token_id,
                                            max_new_tokens=max_new_tokens, marker_check=marker_check)
            finished[row] = done
            if not done:
                keep.append(position)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(rows):
            if mask is not None and not any(padded[rows[position]] for position in keep):
                # transformers drops an all-ones mask (another attention path); keep one padded row, as the full
                # batch would, so every step runs the attention the batch ran
                keep.append(next(position for position, row in enumerate(rows) if padded[row]))
                keep.sort()
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            rows = [rows[position] for position in keep]
            next_tokens, step_positions = next_tokens[index], step_positions[index]
            mask = mask[index] if mask is not None else None
        step_ids = next_tokens[:, None]
        step_positions = step_positions[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    return generated


class StaticKVCache:
    """Keys and values of every layer in tensors preallocated for the whole generation, written in place at
    `write_positions` (a device tensor the decoding loop advances): fixed shapes and addresses, which is what a CUDA
    graph needs. Implements the part of transformers' Cache interface the decoder layers call (`update`)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_positions: torch.Tensor):
        self.keys, self.values, self.write_positions = keys, values, write_positions

    @classmethod
    def from_prefill(cls, cache: Any, slots: int, write_positions: torch.Tensor) -> StaticKVCache:
        """Copy a prefilled DynamicCache into tensors of `slots` positions (the rest zero, masked out)."""
        keys, values = [], []
        for layer in cache.layers:
            for source, target in ((layer.keys, keys), (layer.values, values)):
                static = source.new_zeros((*source.shape[:2], slots, source.shape[3]))
                static[:, :, : source.shape[2]] = source
                target.append(static)
        return cls(keys, values, write_positions)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.write_positions, key_states)
        self.values[layer_idx].index_copy_(2, self.write_positions, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class DecodeStep:
    """One greedy decoding step over a StaticKVCache, with every input in a fixed buffer: `ids` (the last
    tokens), `positions`, `mask` (which cache slots each row may attend to) and the cache's write position. On
    CUDA it is captured in a CUDA graph at the first call and replayed afterwards."""

    def __init__(self, network: Any, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor, *, use_graph: bool):
        self.network, self.cache, self.ids, self.positions, self.mask = network, cache, ids, positions, mask
        self.next_tokens = torch.empty(ids.shape[0], dtype=torch.long, device=ids.device)
        self.use_graph, self.graph = use_graph, None

    def _forward(self) -> None:
        logits = self.network(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions,
                              past_key_values=self.cache, use_cache=True, logits_to_keep=1, return_dict=True).logits
        self.next_tokens.copy_(_greedy_tokens(logits))

    def _capture(self) -> None:
        # warm-up on a side stream (allocator, cuBLAS handles, lazy kernels), then capture; both recompute the
        # current step, whose cache slot and output the replay overwrites with the same values
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._forward()

    def __call__(self) -> torch.Tensor:
        """Attend to the current write slot, compute the next tokens, then move every buffer one step on."""
        self.mask.index_fill_(-1, self.cache.write_positions, True)
        if not self.use_graph:
            self._forward()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        self.ids.copy_(self.next_tokens[:, None])
        self.positions.add_(1)
        self.cache.write_positions.add_(1)
        return self.next_tokens


@torch.inference_mode()
def graphed_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    marker_check: MarkerCheck | None = None,
    check_every: int = 16,
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch with a static KV cache, the step graph-captured on CUDA.

    The prefill is `greedy_generate`'s (and `generate()`'s) first call; its cache is copied into a StaticKVCache
    of prompt + max_new_tokens slots. Each step attends to the prompt's real tokens and every generated one, the
    same keys `generate()`'s mask allows; masked slots add nothing. Rows keep decoding after they finish (their
    tokens are discarded, as `generate()` discards its padding), and the host looks at the tokens only every
    `check_every` steps, to stop once every row is done.
    """
    from transformers import DynamicCache

    network = _forward_model(model)
    device = input_ids.device
    batch, prompt_length = input_ids.shape
    slots = prompt_length + max_new_tokens
    window = getattr(network.config, "sliding_window", None)
    if window is not None and slots > window:
        raise PipelineError(f"graphed generation keeps every key in view, but the model attends within a "
                            f"{window}-token sliding window and this batch needs {slots} positions; use generation "
                            f"'plain' or 'fast'.")
    position_ids, prefill_mask = _prefill_inputs(attention_mask)
    prefill = network(input_ids=input_ids, attention_mask=prefill_mask, position_ids=position_ids,
                      past_key_values=DynamicCache(config=network.config), use_cache=True, logits_to_keep=1,
                      return_dict=True)
    first_tokens = _greedy_tokens(prefill.logits)
    write_positions = torch.tensor([prompt_length], dtype=torch.long, device=device)
    cache = StaticKVCache.from_prefill(prefill.past_key_values, slots, write_positions)
    del prefill
    mask = torch.zeros((batch, 1, 1, slots), dtype=torch.bool, device=device)
    mask[:, 0, 0, :prompt_length] = attention_mask.bool()
    step = DecodeStep(network, cache, first_tokens[:, None].clone(), position_ids[:, -1:] + 1, mask,
                      use_graph=device.type == "cuda")
    history = [first_tokens]
    generated: list[list[int]] = [[] for _ in range(batch)]
    watched, finished = [False] * batch, [False] * batch
    checked = 0
    for produced in range(1, max_new_tokens + 1):
        if produced == max_new_tokens or produced - checked >= check_every:
            tokens = torch.stack(history[checked:produced], dim=1).tolist()
            for row in range(batch):
                for token in tokens[row]:
                    if finished[row]:
                        break
                    finished[row], watched[row] = take_token(
                        generated[row], token, watched=watched[row], eos_token_id=eos_token_id,
                        max_new_tokens=max_new_tokens, marker_check=marker_check)
            checked = produced
            if all(finished) or produced == max_new_tokens:
                break
        history.append(step().clone())
    return generated


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop_markers: Sequence[str],
    progress: bool = True,
    method: str = "plain",
) -> tuple[list[Generation], dict[str, Any]]:
    """Greedy answers in the prompts' order, and throughput figures for the whole run.

    `method`: plain (model.generate), fast (greedy_generate, dropping finished rows) or graphed
    (graphed_generate: static cache, CUDA graph); see the module docstring. All decode greedily with the same
    stops."""
    method = resolve_generation_method(method)
    if method != "plain" and (blockers := greedy_loop_blockers(model)):
        raise PipelineError(f"the {method} generation loop applies no logits processors, but the model's generation "
                            f"config sets {', '.join(blockers)}; use generation 'plain'.")
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda index: (-len(encoded[index]), index))
    results: list[Generation | None] = [None] * len(prompts)
    new_token_total, started = 0, time.perf_counter()
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    marker_check = MarkerCheck(tokenizer, stop_markers) if method != "plain" else None
    own_loop = {"fast": greedy_generate, "graphed": graphed_generate}.get(method)
    model.eval()
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        input_ids, attention_mask = left_pad([encoded[index] for index in batch], tokenizer.pad_token_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if own_loop is not None:
            rows_new_ids = own_loop(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                    eos_token_id=tokenizer.eos_token_id, marker_check=marker_check)
        else:
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([StopOnMarker(tokenizer, input_ids.shape[1],
                                                                     stop_markers)]),
            )
            rows_new_ids = output[:, input_ids.shape[1] :].tolist()
        for row, index in enumerate(batch):
            new_ids, stopped = split_generated(rows_new_ids[row], tokenizer.eos_token_id, tokenizer.pad_token_id)
            new_token_total += len(new_ids) + int(stopped)
            raw = tokenizer.decode(new_ids, skip_special_tokens=True)
            results[index] = Generation(raw=raw, stopped_by_eos=stopped, new_tokens=len(new_ids))
    elapsed = time.perf_counter() - started
    stats = {"generation": method, "generation_s": round(elapsed, 2), "new_tokens": new_token_total,
             "new_tokens_per_s": round(new_token_total / max(elapsed, 1e-9), 2)}
    return [result for result in results if result is not None], stats
