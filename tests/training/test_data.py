"""The training batches: response-only labels, as the format stage wrote them, reach the loss."""
from __future__ import annotations

from alpaca_qlora.data.formatting import IGNORE_INDEX
from alpaca_qlora.training.data import ResponseOnlyCollator
from alpaca_qlora.training.trainer import run_training
from support.training import make_job


def test_the_labels_reaching_the_loss_are_the_format_stages(tiny_mistral_dir, tokenized, tmp_path):
    job = make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=2)
    seen: list[tuple[list[int], list[int]]] = []

    def capture(module, args, kwargs):
        for ids, labels, mask in zip(kwargs["input_ids"], kwargs["labels"], kwargs["attention_mask"]):
            length = int(mask.sum())
            seen.append((ids[:length].tolist(), labels[:length].tolist()))
            assert (labels[length:] == IGNORE_INDEX).all()

    job.model.get_base_model().register_forward_pre_hook(capture, with_kwargs=True)
    run_training(job, resume=False)
    stored = {tuple(row["input_ids"]): row["labels"] for row in tokenized}
    assert len(seen) == 4
    for ids, labels in seen:
        assert stored[tuple(ids)] == labels


def test_collator_keeps_eos_labels_when_pad_is_eos():
    eos = 2
    rows = [{"input_ids": [1, 5, 6, eos], "labels": [-100, -100, 6, eos]}, {"input_ids": [1, 5], "labels": [-100, 5]}]
    batch = ResponseOnlyCollator(pad_token_id=eos)(rows)
    assert batch["labels"].tolist() == [[-100, -100, 6, eos], [-100, 5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
