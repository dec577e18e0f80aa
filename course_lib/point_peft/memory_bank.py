"""Point-PEFT's memory bank: one frozen-encoder feature per training shape, stored with its encoder's hash.

Derived in notebooks/part2_point_peft/14_point_prior_prompt.ipynb; written to disk by
`python -m data_scripts.build_memory_bank` (the official repository loads such a file but ships
no script that builds it).

The bank is F (S, C): the max-pooled final patch tokens of the frozen pretrained encoder
(`PointMAEEncoder.pooled_features`, in eval mode) for every shape of the downstream training
set, in dataset order, so that row i is dataset index i (which lets a training shape be kept
from retrieving itself). The official code stores its transpose, C x S.

A bank is only meaningful for the encoder that made it: `encoder_sha256(encoder)` hashes every
weight and buffer that the pooled feature depends on (everything but the classification head),
the file records that hash, and `load_memory_bank(path, encoder_sha256=...)` refuses a bank
made by another encoder (a stale bank) with a message saying how to rebuild it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from course_lib import config as course_config
from course_lib.points.point_mae import PointMAEEncoder, extract_features
from course_lib.points.sampling import check_finite

__all__ = [
    "IndexedDataset",
    "MemoryBank",
    "StaleMemoryBankError",
    "build_memory_bank",
    "default_memory_bank_path",
    "encoder_sha256",
    "load_memory_bank",
    "save_memory_bank",
]

FORMAT_VERSION = 1
REBUILD_HINT = "rebuild it with `python -m data_scripts.build_memory_bank` or `build_memory_bank(encoder, train_set)`"


class StaleMemoryBankError(ValueError):
    """The memory bank was made by another encoder than the one it is used with."""


@dataclass
class MemoryBank:
    """Features (S, C) float32, labels (S,) int64, the encoder's hash and how the bank was made.

    Derived in notebooks/part2_point_peft/14_point_prior_prompt.ipynb.
    """

    features: Tensor
    labels: Tensor
    encoder_sha256: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.features, Tensor) or self.features.dim() != 2 or not self.features.is_floating_point():
            raise ValueError("MemoryBank.features must be a floating-point tensor of shape (S, C)")
        self.features = self.features.float()
        self.labels = torch.as_tensor(self.labels).long()
        if self.labels.shape != (self.features.shape[0],):
            raise ValueError(
                f"MemoryBank.labels must have shape (S,) = ({self.features.shape[0]},), got {tuple(self.labels.shape)}"
            )
        if not isinstance(self.encoder_sha256, str) or len(self.encoder_sha256) != 64:
            raise ValueError(f"MemoryBank.encoder_sha256 must be a 64-digit hex string, got {self.encoder_sha256!r}")
        check_finite(self.features, "MemoryBank.features")  # a NaN row would be retrieved by nobody, silently

    @property
    def num_shapes(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def check_encoder(self, expected_sha256: str, source: str = "this memory bank") -> None:
        """Raise StaleMemoryBankError unless the bank was made by the encoder with this hash."""
        if expected_sha256 != self.encoder_sha256:
            raise StaleMemoryBankError(
                f"{source} was built by an encoder with hash {self.encoder_sha256[:12]}..., but it is used with an "
                f"encoder with hash {expected_sha256[:12]}...: its features do not describe this encoder's feature "
                f"space (a stale bank, or another checkpoint or seed); {REBUILD_HINT}"
            )


def encoder_sha256(encoder: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and values of the encoder's state, head excluded.

    Covers all that `pooled_features` depends on (patch and centre embeddings, CLS token and
    position, blocks, final norm, BatchNorm statistics). Values are hashed as float32, so a
    copy moved to another device or dtype and back hashes the same.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder_sha256 expects a point encoder (nn.Module), got {type(encoder).__name__}")
    digest = hashlib.sha256()
    for name, value in sorted(encoder.state_dict().items()):
        if name.startswith("head."):
            continue
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value.long()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()


_hash_encoder = encoder_sha256  # `load_memory_bank` has a parameter of the same name


def build_memory_bank(
    encoder: nn.Module,
    train_set: Dataset,
    *,
    batch_size: int = 64,
    progress: bool = False,
    info: dict[str, Any] | None = None,
) -> MemoryBank:
    """Pass the training set, in order, through the frozen encoder (eval mode): one feature per shape.

    Row i of the bank is `train_set[i]`. `info` (e.g. the data variant, split and point count)
    is stored with the bank.

    Derived in notebooks/part2_point_peft/14_point_prior_prompt.ipynb.
    """
    features, labels = extract_features(encoder, train_set, batch_size=batch_size, progress=progress)
    config = getattr(encoder, "config", None)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    else:
        config = repr(config)  # a backbone of the user's own: its config as text
    record = {"dim": int(features.shape[1]), "num_shapes": int(features.shape[0]), "config": config}
    return MemoryBank(features.float(), labels, encoder_sha256(encoder), record | dict(info or {}))


def save_memory_bank(bank: MemoryBank, path: str | os.PathLike) -> Path:
    """torch.save the bank to `path` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "features": bank.features.detach().cpu().float().contiguous(),
        "labels": bank.labels.detach().cpu(),
        "encoder_sha256": bank.encoder_sha256,
        "info": bank.info,
    }
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_memory_bank(
    path: str | os.PathLike, *, encoder_sha256: str | None = None, encoder: PointMAEEncoder | None = None
) -> MemoryBank:
    """Read a bank written by `save_memory_bank`; refuse it if it belongs to another encoder.

    Give the expected encoder as its hash (`encoder_sha256=`) or the encoder itself
    (`encoder=`, hashed here). A missing file is FileNotFoundError, an unreadable one ValueError,
    a mismatched hash `StaleMemoryBankError` (a ValueError); each message says how to rebuild.

    Derived in notebooks/part2_point_peft/14_point_prior_prompt.ipynb.
    """
    path = Path(path)
    if encoder is not None:
        expected = _hash_encoder(encoder)
        if encoder_sha256 is not None and encoder_sha256 != expected:
            raise ValueError("encoder_sha256 and encoder disagree: give one of them")
        encoder_sha256 = expected
    if not path.exists():
        raise FileNotFoundError(f"no memory bank at {path}: {REBUILD_HINT}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {payload.get('format_version')!r}, expected {FORMAT_VERSION}")
        bank = MemoryBank(payload["features"], payload["labels"], payload["encoder_sha256"], dict(payload["info"]))
    except Exception as error:  # a truncated file, another format, missing keys
        raise ValueError(f"{path} is not a readable memory bank ({error}); {REBUILD_HINT}") from error
    if encoder_sha256 is not None:
        bank.check_encoder(encoder_sha256, source=f"the memory bank {path}")
    return bank


def default_memory_bank_path(variant: str = "pb_t50_rs", num_points: int = 1024) -> Path:
    """`config.CACHE_DIR / "point_peft" / "memory_bank_<variant>_<N>[_fast].pt"` (fast runs kept apart)."""
    suffix = "_fast" if course_config.is_fast() else ""
    return course_config.CACHE_DIR / "point_peft" / f"memory_bank_{variant}_{num_points}{suffix}.pt"


class IndexedDataset(Dataset):
    """Wrap a (points, label) dataset so that items are (points, label, index): the bank rows a
    training batch must not retrieve, `model(points, indices=index)`.

    Derived in notebooks/part2_point_peft/14_point_prior_prompt.ipynb.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        points, label = self.dataset[index]
        return points, label, index
