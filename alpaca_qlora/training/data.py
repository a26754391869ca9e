"""What the Trainer samples: the format stage's rows as stored, their collators, and the tokens they put through.

Rows are served exactly as `data/formatted/train.jsonl` holds them: no re-tokenizing, re-templating or
re-masking happens in training, so what the loss sees is what the format stage wrote.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alpaca_qlora.data.formatting import IGNORE_INDEX
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.training.packing import PackedCollator, PackedDataset, packed_padding


class TokenizedDataset(torch.utils.data.Dataset):
    """The format stage's rows, as the Trainer's dataset; rows are served exactly as stored."""

    def __init__(self, rows: Sequence[dict[str, Any]]):
        for row in rows:
            if len(row["input_ids"]) != len(row["labels"]):
                raise PipelineError(f"row {row.get('id')}: input_ids and labels differ in length; rerun format.")
            if all(label == IGNORE_INDEX for label in row["labels"]):
                raise PipelineError(f"row {row.get('id')}: no labelled token; rerun format.")
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


@dataclass
class TokenCounts:
    """Tokens that went through the model (padding excluded).

    Counted as batches enter the model (a forward pre-hook), not where they are collated: the Trainer collates
    ahead of use, and batches collated after the last step would otherwise count.
    """

    tokens: int = 0
    labelled: int = 0
    padded: int = 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
        if input_ids is None or labels is None or not module.training:
            return
        mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None:
            real = int(mask.sum())
        elif position_ids is not None:
            real = input_ids.numel() - packed_padding(labels, position_ids)
        else:
            real = input_ids.numel()
        self.tokens += real
        self.labelled += int((labels != IGNORE_INDEX).sum())
        self.padded += input_ids.numel() - real

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(self.tokens + other.tokens, self.labelled + other.labelled, self.padded + other.padded)


@dataclass
class ResponseOnlyCollator:
    """Right-pads a micro-batch: padding gets attention 0 and label IGNORE_INDEX, whatever the pad token's id is.

    Masking padding by position (not by comparing ids to the pad id) keeps EOS labels even when pad == EOS.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(feature["input_ids"]) for feature in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_collator(packing: bool, pad_token_id: int) -> ResponseOnlyCollator | PackedCollator:
    return PackedCollator(pad_token_id=pad_token_id) if packing else ResponseOnlyCollator(pad_token_id=pad_token_id)


def training_items(dataset: TokenizedDataset, train: Any) -> torch.utils.data.Dataset:
    """Rows, or with packing the bins they were packed into (micro_batch_size counts bins then)."""
    if train.packing:
        return PackedDataset(dataset.rows, train.max_seq_length, train.seed)
    return dataset
