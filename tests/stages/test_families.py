"""Each model family through the real stages: fetch, sample, format, train, evaluate, compare and package under
`dvc repro`, on a tiny random-init model of the family's architecture with its tokenizer (support/families.py,
support/family_tokenizers.py). Then what the outs must hold for that family: the prompt masked, EOS labelled once at
the end of the response, BOS as the family's tokenizer puts it, padding that never hides an EOS label, packed rows
that never see each other, `auto` generation equal to `plain` and stopped by the family's EOS, a chat template that
renders the training prompt, and `infer` answering as the evaluation did.

Mistral's run of the same stages is tests/stages/test_pipeline.py's.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from alpaca_qlora import infer
from alpaca_qlora.data.formatting import IGNORE_INDEX
from alpaca_qlora.generation.greedy import forward_model
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.stage_params import stage_params
from alpaca_qlora.training.data import make_collator
from support import ROOT
from support.commands import free_port, run, run_together
from support.families import FAMILY_CONFIGS
from support.projects import make_project, tiny_params
from support.stages import stage_script
from support.training import assert_packed_rows_apart, assert_same_adapter

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class TokenRule:
    """What the released model's tokenizer does, written down here (not read from the tokenizer under test), so a
    pipeline that drops BOS, doubles it or ends responses with another token fails."""
    bos: str | None  # the token every sequence starts with, or None where the family has none
    eos: str  # the token that ends a response: what training labels and what generation stops at


TOKEN_RULES = {
    "llama3": TokenRule(bos="<|begin_of_text|>", eos="<|eot_id|>"),  # Instruct's turn end, not <|end_of_text|>
    "qwen2.5": TokenRule(bos=None, eos="<|im_end|>"),
    "qwen3": TokenRule(bos=None, eos="<|im_end|>"),
    "gemma2": TokenRule(bos="<bos>", eos="<eos>"),
    "gemma3-text": TokenRule(bos="<bos>", eos="<eos>"),
    "phi3": TokenRule(bos="<s>", eos="<|endoftext|>"),
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_family) -> dict[str, tuple[Path, Path, str]]:
    """family -> (its scratch project, its model's folder, dvc repro's failure or ""), the repros two at a time."""
    assert sorted(TOKEN_RULES) == sorted(FAMILY_CONFIGS)
    projects = {}
    for family in sorted(FAMILY_CONFIGS):
        params = tiny_params(tiny_family(family), lora={"target_modules": "all-linear"},
                             train={"max_seq_length": 192}, eval={"generation": "auto"})
        projects[family] = make_project(tmp_path_factory.mktemp(f"project-{family}"), params)
    results = run_together([([sys.executable, "-m", "dvc", "repro"], project, {"PYTHONPATH": str(project)})
                            for project in projects.values()], HF_HUB_OFFLINE="1")
    return {family: (project, tiny_family(family), "" if result.returncode == 0 else
                     f"dvc repro failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
            for (family, project), result in zip(projects.items(), results)}


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def repro(request, reproduced):
    """(family, its scratch project after `dvc repro`, its model's folder)."""
    project, model_dir, failure = reproduced[request.param]
    assert not failure, failure
    return request.param, project, model_dir


def test_every_stage_ran_packed_with_the_family_targets(repro):
    family, project, _ = repro
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["lora_target_modules_resolved"]  # all-linear, resolved on this architecture
    assert train["steps"] == 2 and math.isfinite(train["final_loss"]) and train["final_loss"] > 0
    adapter = load_file(project / "models/adapter/adapter_model.safetensors")
    # B starts at zero, and warm-up gives the first step a learning rate of 0: the second step moves it
    assert any(bool(tensor.any()) for name, tensor in adapter.items() if "lora_B" in name)
    # Packed: bins of whole rows pad only their tails, where padded micro-batches of these rows (some 40 tokens,
    # some 190) would be a third padding or more.
    assert stage_params("train", project / "params.yaml", project / "dvc.yaml").train.packing
    assert train["padding_fraction"] < 0.1
    for which in ("base", "finetuned"):
        run_info = json.loads((project / f"metrics/eval_{which}.json").read_text())["run"]
        assert run_info["generation"] in ("fast", "plain")  # auto on CPU: fast, or plain with a logged reason
    assert "exact_match_delta" in json.loads((project / "metrics/compare.json").read_text())["overall"]
    assert (project / "models/release/adapter_model.safetensors").is_file()


def test_the_prompt_is_masked_and_eos_labelled_once_at_the_end(repro):
    family, project, model_dir = repro
    rule, tokenizer = TOKEN_RULES[family], AutoTokenizer.from_pretrained(str(model_dir))
    eos = tokenizer.convert_tokens_to_ids(rule.eos)
    sampled = {row["id"]: row for row in read_jsonl(project / "data/sampled/train.jsonl")}
    max_length = stage_params("format", project / "params.yaml", project / "dvc.yaml").train.max_seq_length
    formatted = read_jsonl(project / "data/formatted/train.jsonl")
    whole = [row for row in formatted if len(row["input_ids"]) < max_length]  # the others were cut at the limit
    assert len(whole) >= len(formatted) // 2
    for row in formatted:
        ids, labels = row["input_ids"], row["labels"]
        prompt_length = next(index for index, label in enumerate(labels) if label != IGNORE_INDEX)
        assert labels[prompt_length:] == ids[prompt_length:]  # the prompt masked, every response token learned
        if len(ids) == max_length:  # a cut response never learns to stop mid-answer
            assert eos not in labels
            continue
        assert labels.count(eos) == 1 and labels[-1] == eos and ids.count(eos) == 1
        if rule.bos is None:
            assert tokenizer.bos_token_id is None or tokenizer.bos_token_id not in ids
        else:
            assert ids[0] == tokenizer.convert_tokens_to_ids(rule.bos) and ids.count(ids[0]) == 1
        source = sampled[row["id"]]
        response = tokenizer.decode(ids[prompt_length:-1])
        assert response == source["output"]
        assert source["instruction"] in tokenizer.decode(ids[:prompt_length], skip_special_tokens=True)


def test_padding_and_packing_keep_every_eos_label(repro):
    family, project, model_dir = repro
    tokenizer = load_tokenizer(str(model_dir))  # as the train stage loads it, pad chosen
    eos = tokenizer.convert_tokens_to_ids(TOKEN_RULES[family].eos)
    if family == "llama3":  # no pad, no unknown token: padding is EOS, so it must be masked by position
        assert tokenizer.pad_token_id == eos
    rows = [{"input_ids": row["input_ids"], "labels": row["labels"]}
            for row in read_jsonl(project / "data/formatted/train.jsonl")][:6]
    padded = make_collator(False, tokenizer.pad_token_id)(rows)
    assert int((padded["labels"] == eos).sum()) == len(rows)
    packed = make_collator(True, tokenizer.pad_token_id)([rows[:3], rows[3:]])
    assert int((packed["labels"] == eos).sum()) == len(rows)


def test_packed_rows_never_attend_across_rows(repro):
    _, project, model_dir = repro
    model = load_model(str(model_dir), plan_quantization("none", "cpu"), device="cpu").eval()
    assert_packed_rows_apart(model, read_jsonl(project / "data/formatted/train.jsonl")[:3])


def says_eos_on_third_token(model, eos: int):
    """Make `model` answer EOS as its third new token in every row, in every generation path (they all call the
    transformers model's forward, the prompt first): a model that stops, where a random-init one never would."""
    calls = {"since_prompt": 0}

    def hook(module, args, kwargs, output):
        calls["since_prompt"] = 0 if kwargs["input_ids"].shape[1] > 1 else calls["since_prompt"] + 1
        if calls["since_prompt"] == 2:
            output.logits[:, -1, eos] = output.logits.abs().max() + 1e3
        return output
    return forward_model(model).register_forward_hook(hook, with_kwargs=True)


def test_auto_generation_equals_plain_and_stops_at_the_family_eos(repro, monkeypatch):
    family, project, _ = repro
    monkeypatch.chdir(project)
    evaluate = stage_script("evaluate")
    params = stage_params("evaluate_finetuned")
    rows = evaluate.read_eval_rows()
    answers, stopped = {}, {}
    for method in ("plain", "auto"):
        loaded, _, _ = evaluate.load_for_eval("finetuned", params, method)
        answers[method], _ = evaluate.answer(rows, loaded, params, method=method, max_new_tokens=8, progress=False)
        eos = loaded.tokenizer.convert_tokens_to_ids(TOKEN_RULES[family].eos)
        assert loaded.tokenizer.eos_token_id == eos
        # the model that decodes: on CPU auto's float32 copy (float64 only decides near ties, in whole sequences)
        handles = [says_eos_on_third_token(model, eos) for model in (loaded.model, loaded.float32_copy) if model]
        try:
            stopped[method], _ = evaluate.answer(rows, loaded, params, method=method, max_new_tokens=8,
                                                 progress=False)
        finally:
            for handle in handles:
                handle.remove()
    assert answers["auto"] == answers["plain"]  # prompts longer than the tiny Gemmas' window: it is applied alike
    assert any(answer.raw for answer in answers["auto"])  # real text compared, not empty answers
    assert stopped["auto"] == stopped["plain"]
    assert all(answer.stopped_by_eos and answer.new_tokens == 2 for answer in stopped["auto"])


def test_the_adapters_chat_template_renders_the_training_prompt(repro):
    _, project, model_dir = repro
    tokenizer = AutoTokenizer.from_pretrained(str(project / "models/release"))
    sampled = {row["id"]: row for row in read_jsonl(project / "data/sampled/train.jsonl")}
    for row in read_jsonl(project / "data/formatted/train.jsonl")[:4]:
        prompt_ids = [token for token, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
        source = sampled[row["id"]]
        message = {"role": "user", "content": source["instruction"], "input": source.get("input", "")}
        chat = tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert chat["input_ids"] == prompt_ids


def test_infer_answers_as_the_evaluation_did(repro, capsys, monkeypatch):
    _, project, _ = repro
    monkeypatch.chdir(project)
    eval_row = read_jsonl(project / "data/sampled/eval.jsonl")[0]
    prediction = next(row for row in read_jsonl(project / "data/predictions/finetuned.jsonl")
                      if row["id"] == eval_row["id"])
    infer.main([eval_row["instruction"], "--input", eval_row.get("input", ""), "--max-new-tokens", "6"])
    assert capsys.readouterr().out == prediction["answer"] + "\n"


def test_fsdp2_shards_every_family_and_gathers_its_adapter(tiny_family, tmp_path):
    """FSDP2 on two gloo processes, wrapped as the train stage wraps it (a unit per decoder layer, the output
    projection left whole: Gemma's is tied to the input embeddings, which stay whole with it), all-linear targets;
    the adapter the stage gathers is the one before sharding. (On GPUs accelerate does the wrapping: README.)"""
    families = sorted(FAMILY_CONFIGS)
    run([sys.executable, "-m", "support.fsdp_gather", str(tmp_path), str(free_port()),
         *(str(tiny_family(family)) for family in families), "--all-linear"], cwd=ROOT)
    for index, family in enumerate(families):
        out = tmp_path / str(index)
        ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        for rank in ranks:
            assert rank["sharded"] and rank["others_dtensor"] and rank["whole_is_the_output_projection"], family
        assert ranks[0]["gathered"] > 0 and ranks[1]["gathered"] == 0, family  # process 0 alone receives it
        before = load_file(str(out / "before.safetensors"))
        assert before and all("lora_" in name for name in before), family
        assert_same_adapter(load_file(str(out / "gathered.safetensors")), before)
