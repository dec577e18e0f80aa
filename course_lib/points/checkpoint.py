"""The tiny Point-MAE's checkpoint: a torch file of plain data, listed with its SHA-256.

Derived in notebooks/part2_point_peft/12_point_mae.ipynb (pretraining itself is
`course_lib.points.pretrain`, which re-exports everything here).

The checkpoint (`save_checkpoint` / `load_pretrained_point_mae`) holds the encoder's pretrained
weights (and the decoder's, for pictures of reconstructions), the configs, and a record of the
run, all as plain data that `torch.load(weights_only=True)` reads without running code. Its
SHA-256 is listed in `SHA256SUMS` beside it, in `sha256sum`'s format; a file whose hash does not
match is refused. Weights are stored as float16 to halve the file and loaded back as float32.
A missing checkpoint can be pretrained on the spot (`load_pretrained_point_mae`).

The shipped `course_lib/checkpoints/point_mae_tiny.pt` is written by `python -m data_scripts.pretrain_point_mae`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from course_lib import config as course_config
from course_lib.download import sha256_of
from course_lib.points.masked_autoencoder import MaskedAutoencoder, PretrainConfig
from course_lib.points.point_mae import PointMAEConfig, PointMAEEncoder

__all__ = [
    "CHECKPOINT_NAME",
    "default_checkpoint_path",
    "file_sha256",
    "load_pretrained_masked_autoencoder",
    "load_pretrained_point_mae",
    "read_checkpoint",
    "read_sha256sums",
    "save_checkpoint",
    "update_sha256sums",
]

#: File name of the shipped checkpoint inside `config.CHECKPOINT_DIR`.
CHECKPOINT_NAME = "point_mae_tiny.pt"
_FORMAT = "course_lib.point_mae"
_FORMAT_VERSION = 1
_REPRODUCE = "python -m data_scripts.pretrain_point_mae"

#: Hex SHA-256 of a file's bytes (what `sha256sum` prints): `course_lib.download.sha256_of`.
file_sha256 = sha256_of


def default_checkpoint_path() -> Path:
    """`config.CHECKPOINT_DIR / "point_mae_tiny.pt"`, the shipped checkpoint."""
    return course_config.CHECKPOINT_DIR / CHECKPOINT_NAME


def read_sha256sums(path: str | os.PathLike) -> dict[str, str]:
    """{file name: hex digest} from a `sha256sum`-style file ("<hex>  <name>" per line); {} if missing."""
    path = Path(path)
    if not path.exists():
        return {}
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{path}, line {number}: expected '<64 hex digits>  <file name>', got {line!r}")
        sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


def _write_atomic(path: Path, write) -> None:
    """Call write(handle) on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it the usual mode
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def update_sha256sums(file: str | os.PathLike, sums_path: str | os.PathLike | None = None) -> str:
    """Put `file`'s current SHA-256 into the SHA256SUMS beside it (or `sums_path`); returns the digest.

    Other entries are kept; the list stays sorted by name, so `sha256sum -c SHA256SUMS` checks it.
    """
    file = Path(file)
    sums_path = Path(sums_path) if sums_path is not None else file.parent / "SHA256SUMS"
    sums = read_sha256sums(sums_path)
    sums[file.name] = sha256_of(file)
    text = "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
    _write_atomic(sums_path, lambda handle: handle.write(text.encode()))
    return sums[file.name]


def _encoder_pretrained_state(encoder: PointMAEEncoder) -> dict[str, Tensor]:
    """The encoder's pretrained weights: everything but the CLS token/position and the head."""
    return {name: value for name, value in encoder.state_dict().items() if not _is_not_pretrained(name)}


def _to_storage(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()) for name, v in state.items()}


def _plain_data(record: dict[str, Any]) -> dict[str, Any]:
    """`record` as plain JSON data (str, numbers, lists, dicts), which `torch.load(weights_only=True)` reads."""
    try:
        return json.loads(json.dumps(record))
    except TypeError as error:
        raise TypeError(f"the checkpoint record must be plain JSON data (str, numbers, lists, dicts): {error}") from None


def save_checkpoint(
    model: MaskedAutoencoder,
    path: str | os.PathLike,
    *,
    pretrain_config: PretrainConfig | None = None,
    record: dict[str, Any] | None = None,
    update_sums: bool = True,
) -> str:
    """Write the pretrained encoder (and decoder) to `path` atomically; returns its SHA-256.

    The file holds the configs, the encoder's pretrained weights (no CLS token, no head), the
    decoder's weights, both as float16, and `record` (data, loss curve, time...). With
    `update_sums`, the SHA256SUMS file beside it gets the new hash.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    if not isinstance(model, MaskedAutoencoder):
        raise TypeError(f"save_checkpoint expects a MaskedAutoencoder, got {type(model).__name__}")
    pretrain_config = pretrain_config or PretrainConfig(
        mask_ratio=model.mask_ratio,
        decoder_depth=len(model.decoder_blocks),
        decoder_num_heads=model.decoder_blocks[0].config.num_heads,
    )
    payload = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "config": model.encoder.config.to_dict(),
        "pretrain_config": pretrain_config.to_dict(),
        "storage_dtype": "float16",
        "encoder": _to_storage(_encoder_pretrained_state(model.encoder)),
        "decoder": _to_storage(model.decoder_state_dict()),
        "record": _plain_data(record or {}),
    }
    path = Path(path)
    _write_atomic(path, lambda handle: torch.save(payload, handle))
    return update_sha256sums(path) if update_sums else sha256_of(path)


def read_checkpoint(
    path: str | os.PathLike | None = None, *, sha256: str | None = None, verify: bool = True
) -> dict[str, Any]:
    """Load a checkpoint file written by `save_checkpoint`, after checking its SHA-256.

    The expected hash is `sha256` if given, else the file's entry in the SHA256SUMS beside it.
    A file that is missing, unlisted, changed or unreadable raises an error saying what to do.
    `verify=False` skips the hash check (for a checkpoint of your own).

    The file is read (and its hash checked) once per process while it stays the same file (same
    path, size and modification time): notebook 16's runs build a dozen models from it. The
    returned dict is a new one each time; its tensors are shared, so treat them as read-only
    (`load_state_dict` copies them into the model).

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    path = Path(path) if path is not None else default_checkpoint_path()
    if not path.is_file():
        raise FileNotFoundError(f"no Point-MAE checkpoint at {path}: create it with `{_REPRODUCE}`")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, sha256, verify)
    if key not in _READ_CACHE:
        _READ_CACHE.clear()  # one file at a time: a few MB
        _READ_CACHE[key] = _read_checkpoint_file(path, sha256, verify)
    return {name: dict(value) if isinstance(value, dict) else value for name, value in _READ_CACHE[key].items()}


#: (path, size, mtime, sha256, verify) -> the payload of the checkpoint file last read
_READ_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}


def _read_checkpoint_file(path: Path, sha256: str | None, verify: bool) -> dict[str, Any]:
    if verify:
        expected = sha256
        if expected is None:
            sums_path = path.parent / "SHA256SUMS"
            expected = read_sha256sums(sums_path).get(path.name)
            if expected is None:
                raise ValueError(
                    f"{path.name} is not listed in {sums_path}, so its integrity cannot be checked: pass "
                    "sha256=... or verify=False for a checkpoint of your own"
                )
        actual = sha256_of(path)
        if actual != expected.lower():
            raise ValueError(
                f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. The file is corrupted or was "
                f"changed; restore it (git checkout) or recreate it with `{_REPRODUCE}`"
            )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged zip, a pickle that is not plain data...
        raise ValueError(
            f"{path} is not a readable Point-MAE checkpoint ({error}); recreate it with `{_REPRODUCE}`"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a course_lib Point-MAE checkpoint (no format tag {_FORMAT!r})")
    missing = [key for key in ("config", "pretrain_config", "encoder", "decoder", "record") if key not in payload]
    if missing:
        raise ValueError(f"{path} lacks the entries {missing}: recreate it with `{_REPRODUCE}`")
    if payload.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {payload.get('format_version')}, this course_lib reads "
            f"version {_FORMAT_VERSION}: recreate it with `{_REPRODUCE}`"
        )
    return payload


def _load_weights(module: nn.Module, state: dict[str, Tensor], allowed_missing, what: str, path) -> None:
    """Copy `state` into `module` (float16 -> the module's dtype); clear errors on any mismatch."""
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(name for name in set(own) - set(state) if not allowed_missing(name))
    wrong_shape = [
        f"{name}: checkpoint {tuple(state[name].shape)}, model {tuple(own[name].shape)}"
        for name in sorted(set(state) & set(own))
        if state[name].shape != own[name].shape
    ]
    if unexpected or missing or wrong_shape:
        raise ValueError(
            f"the {what} weights in {path} do not fit the model built from its config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong_shape[:5]}. "
            f"Recreate the checkpoint with `{_REPRODUCE}`"
        )
    converted = {name: value.to(own[name].dtype) for name, value in state.items()}
    module.load_state_dict(converted, strict=False)


def _is_not_pretrained(name: str) -> bool:
    """Encoder entries a checkpoint leaves out: the CLS token and position, and the head."""
    return name.startswith("head.") or name in ("cls_token", "cls_position")


def _encoder_from_payload(
    payload: dict[str, Any], path, config: PointMAEConfig | None, num_classes: int | None
) -> PointMAEEncoder:
    stored = PointMAEConfig.from_dict(payload["config"])
    if config is not None:
        if not isinstance(config, PointMAEConfig):
            raise TypeError(f"config must be a PointMAEConfig, got {type(config).__name__}")
        differences = stored.encoder_differences(config)
        if differences:
            listed = ", ".join(f"{name}: checkpoint {a!r}, asked {b!r}" for name, (a, b) in differences.items())
            raise ValueError(
                f"the checkpoint {path} was trained with another encoder config ({listed}). Use its config "
                f"(config=None), or pretrain one for yours with `{_REPRODUCE}`"
            )
        stored = dataclasses.replace(stored, **{name: getattr(config, name) for name in PointMAEConfig.HEAD_FIELDS})
    if num_classes is not None:
        stored = dataclasses.replace(stored, num_classes=num_classes)
    encoder = PointMAEEncoder(stored)  # CLS token/position and head freshly initialised
    _load_weights(encoder, payload["encoder"], _is_not_pretrained, "encoder", path)
    return encoder


def load_pretrained_point_mae(
    path: str | os.PathLike | None = None,
    *,
    config: PointMAEConfig | None = None,
    num_classes: int | None = None,
    pretrain_if_missing: bool = False,
    sha256: str | None = None,
    verify: bool = True,
    progress: bool = True,
) -> PointMAEEncoder:
    """The pretrained tiny Point-MAE encoder (default: the shipped `course_lib/checkpoints/point_mae_tiny.pt`).

    - The file's SHA-256 must match its SHA256SUMS entry (or `sha256`); see `read_checkpoint`.
    - `config`, if given, must match the checkpoint's encoder sizes (its head fields are used);
      by default the checkpoint's own config is used. `num_classes` resizes the head.
    - The CLS token, its position and the head are freshly initialised from torch's global
      generator (seed it first), as when Point-MAE starts fine-tuning. In eval mode.
    - A missing checkpoint is FileNotFoundError (with the command that writes it). Loading never
      trains by itself unless asked: `pretrain_if_missing=True` runs
      `course_lib.points.pretrain.pretrain_and_save` first (the full run, about ten minutes, saved
      to `path` with its hash; under COURSE_FAST=1 a few steps, not saved).

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    path = Path(path) if path is not None else default_checkpoint_path()
    if not path.exists():
        if not pretrain_if_missing:
            raise FileNotFoundError(f"no Point-MAE checkpoint at {path}: create it with `{_REPRODUCE}` "
                                    "(about ten minutes), or pass pretrain_if_missing=True")  # fmt: skip
        from course_lib.points.pretrain import (
            pretrain_and_save,  # trains: only when asked
        )

        return _encoder_from_payload(pretrain_and_save(path, progress=progress), path, config, num_classes).eval()
    payload = read_checkpoint(path, sha256=sha256, verify=verify)
    return _encoder_from_payload(payload, path, config, num_classes).eval()


def load_pretrained_masked_autoencoder(
    path: str | os.PathLike | None = None, *, sha256: str | None = None, verify: bool = True
) -> MaskedAutoencoder:
    """The whole pretrained masked autoencoder (encoder + decoder), e.g. to look at reconstructions.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    path = Path(path) if path is not None else default_checkpoint_path()
    payload = read_checkpoint(path, sha256=sha256, verify=verify)
    encoder = _encoder_from_payload(payload, path, None, None)
    pc = PretrainConfig.from_dict(payload["pretrain_config"])
    model = MaskedAutoencoder(encoder, pc.mask_ratio, pc.decoder_depth, pc.decoder_num_heads)
    state = {f"encoder.{name}": value for name, value in payload["encoder"].items()} | payload["decoder"]

    def not_pretrained(name: str) -> bool:
        return name.startswith("encoder.") and _is_not_pretrained(name.removeprefix("encoder."))

    _load_weights(model, state, not_pretrained, "encoder + decoder", path)
    return model.eval()
