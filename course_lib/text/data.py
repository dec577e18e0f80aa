"""Text classification data as plain lists, and the tokenizing collate that batches it.

A split is a list of texts (or text pairs, for GLUE's sentence-pair tasks) and integer labels.
Batches are tokenized on the fly with padding to the longest text of the batch, which keeps
short-sentence batches short (a batch of 20-token sentences costs 20 tokens, not 128).

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["TextSplit", "TextDataset", "TextCollator", "make_loader"]


@dataclass(frozen=True)
class TextSplit:
    """One split of a text classification task.

    `text_pairs` holds the second sentence of sentence-pair tasks (None otherwise); `kinds`
    optionally names the construction of each example (e.g. "contrast"), for per-kind accuracy.
    """

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]
    text_pairs: list[str] | None = None
    kinds: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.text_pairs)} text pairs")
        if self.kinds is not None and len(self.kinds) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.kinds)} kinds")
        bad = [label for label in self.labels if not 0 <= label < len(self.label_names)]
        if bad:
            raise ValueError(f"labels must lie in 0..{len(self.label_names) - 1}, found {bad[:5]}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Sequence[int]) -> "TextSplit":
        """The examples at `indices`, in that order."""
        pick = lambda values: None if values is None else [values[i] for i in indices]  # noqa: E731
        return TextSplit(pick(self.texts), pick(self.labels), self.label_names, pick(self.text_pairs), pick(self.kinds))


class TextDataset(Dataset):
    """A TextSplit as a torch Dataset of dicts {"text", ["text_pair"], "label"}."""

    def __init__(self, split: TextSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"text": self.split.texts[index], "label": self.split.labels[index]}
        if self.split.text_pairs is not None:
            item["text_pair"] = self.split.text_pairs[index]
        return item


class TextCollator:
    """Tokenizes a list of dataset items into an HF-style batch with "labels".

    Pads to the longest item of the batch (or, with `pad_to_max_length`, every batch to
    `max_length`, as the official DEFT and MEFT scripts' `--pad_to_max_length` do) and truncates
    at `max_length` tokens.
    """

    def __init__(self, tokenizer, max_length: int = 128, *, pad_to_max_length: bool = False) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (the [CLS] and [SEP] tokens), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [item["text"] for item in items]
        pairs = [item["text_pair"] for item in items] if "text_pair" in items[0] else None
        batch = self.tokenizer(
            texts,
            pairs,
            padding="max_length" if self.pad_to_max_length else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = dict(batch)
        batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
        return batch


def make_loader(
    split: TextSplit,
    tokenizer,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    max_length: int = 128,
    pad_to_max_length: bool = False,
    seed: int | None = None,
) -> DataLoader:
    """A DataLoader of tokenized batches (dicts with input_ids, attention_mask, ..., labels).

    Batches are padded to their longest sentence; `pad_to_max_length=True` pads every batch to
    `max_length` tokens instead (the DEFT paper's protocol, notebook 22).

    With `shuffle=True`, `seed` fixes the order of every epoch; without a seed the order
    follows torch's global RNG (which `course_lib.train.train` seeds).
    """
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(
        TextDataset(split),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=TextCollator(tokenizer, max_length, pad_to_max_length=pad_to_max_length),
        generator=generator,
    )
