"""A battery of bad inputs across course_lib's public API and the data scripts.

Each case names what a user might pass, the error it must raise, and words the message must
contain (what was wrong, or what to do). Cases that write files also check that nothing
half-written is left where a later run would trust it. Other test files hold the deeper tests
of each module; this one is the checklist (its ids are the list in the closing note of issue 13).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from course_lib.deft import DEFTLoss, SparsityConfig, calibrate_thresholds, density_loss, measure_density
from course_lib.meters import count_active
from course_lib.peft import inject_peft
from course_lib.point_peft import MemoryBank, build_memory_bank, load_memory_bank, parameter_free_attention, save_memory_bank
from course_lib.points import ball_query, farthest_point_sample, group_points, knn
from course_lib.points.datasets import PointCloudDataset, load_scanobjectnn
from course_lib.results import write_json
from course_lib.run_cache import RunCache
from course_lib.text import load_glue_tsv, make_loader
from course_lib.text.data import TextCollator

CLOUD = torch.rand(2, 64, 3)


def with_value(value: float, at=(0, 5, 1)) -> torch.Tensor:
    points = CLOUD.clone()
    points[at] = value
    return points


class TinyMLP(nn.Module):
    """A BERT-like intermediate block: enough for the DEFT entry points."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 32)
        self.intermediate_act_fn = nn.GELU()
        self.out = nn.Linear(32, 8)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None):
        h = self.out(self.intermediate_act_fn(self.dense(inputs_embeds)))
        return h


POINT_CASES = {
    "fps_nan_point": (lambda: farthest_point_sample(with_value(math.nan), 8), ValueError, "NaN or inf"),
    "fps_inf_point": (lambda: farthest_point_sample(with_value(math.inf), 8), ValueError, "NaN or inf"),
    "knn_nan_query": (lambda: knn(with_value(math.nan, at=(0, 1, 1))[:, :4], CLOUD, 4), ValueError, "query contains"),
    "ball_query_nan_points": (lambda: ball_query(CLOUD[:, :4], with_value(-math.inf), 0.2, 4), ValueError, "NaN or inf"),
    "fps_more_centres_than_points": (lambda: farthest_point_sample(CLOUD, 65), ValueError, "65"),
    "knn_k_over_n": (lambda: knn(CLOUD[:, :4], CLOUD, 100), ValueError, "100"),
    "ball_query_negative_radius": (lambda: ball_query(CLOUD[:, :4], CLOUD, -0.1, 4), ValueError, "radius"),
    "one_cloud_without_batch_dim": (lambda: farthest_point_sample(CLOUD[0], 8), ValueError, "unsqueeze"),
    "integer_points": (lambda: farthest_point_sample(CLOUD.long(), 8), TypeError, "floating"),
    "empty_cloud": (lambda: farthest_point_sample(torch.zeros(2, 0, 3), 1), ValueError, "no points"),
    "group_k_over_n": (lambda: group_points(CLOUD, CLOUD[:, :8], 65), ValueError, "65"),
    "dataset_with_nan_point": (
        lambda: PointCloudDataset(with_value(math.nan).numpy(), [0, 1], ["a", "b"]), ValueError, "NaN or inf"),
    "dataset_label_out_of_range": (lambda: PointCloudDataset(CLOUD.numpy(), [0, 5], ["a", "b"]), ValueError, "labels"),
}


def _bank(features: torch.Tensor) -> MemoryBank:
    return MemoryBank(features, torch.zeros(len(features), dtype=torch.long), "0" * 64)


PROMPT_CASES = {
    "bank_with_nan_feature": (lambda: _bank(torch.tensor([[1.0, math.nan], [0.0, 1.0]])), ValueError, "NaN or inf"),
    "retrieval_nan_query": (
        lambda: parameter_free_attention(torch.tensor([[math.nan, 1.0]]), torch.rand(4, 2), 2), ValueError, "query"),
    "retrieval_top_k_over_bank": (
        lambda: parameter_free_attention(torch.rand(1, 2), torch.rand(4, 2), 9), ValueError, "top_k"),
    "retrieval_dims_differ": (
        lambda: parameter_free_attention(torch.rand(1, 3), torch.rand(4, 2), 2), ValueError, "same C"),
}


def _text_batch(mask) -> dict:
    return {"inputs_embeds": torch.randn(2, 3, 8), "attention_mask": torch.as_tensor(mask)}


DEFT_CASES = {
    "density_loss_nan_mask": (
        lambda: density_loss([torch.randn(2, 3, 32)], torch.tensor([[1.0, math.nan, 0.0], [1.0, 1.0, 1.0]])),
        ValueError, "only 0"),
    "density_loss_soft_mask": (
        lambda: density_loss([torch.randn(2, 3, 32)], torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])),
        ValueError, "soft mask"),
    "density_loss_mask_shape": (
        lambda: density_loss([torch.randn(2, 3, 32)], torch.ones(2, 4)), ValueError, "does not match"),
    "density_meter_nan_activation": (
        lambda: count_active(torch.tensor([[[0.0, math.nan]]])), ValueError, "NaN or inf"),
    "density_meter_negative_threshold": (lambda: count_active(torch.ones(1, 1, 2), -0.1), ValueError, ">= 0"),
    "density_pattern_matches_nothing": (
        lambda: measure_density(TinyMLP(), [_text_batch([[1, 1, 1], [1, 1, 0]])], "no_such_module"),
        ValueError, "no_such_module"),
    "sparsity_target_density_out_of_range": (lambda: SparsityConfig(target_density=1.5), ValueError, "target_density"),
    "calibration_percentile_out_of_range": (
        lambda: calibrate_thresholds(TinyMLP(), [_text_batch([[1, 1, 1], [1, 1, 1]])], 100.0), ValueError, "percentile"),
    "calibration_on_empty_loader": (
        lambda: calibrate_thresholds(TinyMLP(), [], 50.0, "intermediate_act_fn"), ValueError, "empty|no batch"),
    "deft_weight_negative": (lambda: DEFTLoss(weight=-1.0), ValueError, "weight"),
}


def _bert():
    from course_lib.text import load_classifier

    return load_classifier(4)


PEFT_CASES = {
    "lora_targets_match_nothing": (lambda: inject_peft(_bert(), method="lora", target_modules=["nonexistent"]),
                                   ValueError, "nonexistent"),
    "lora_rank_zero": (lambda: inject_peft(_bert(), method="lora", r=0), ValueError, "rank"),
    "unknown_method": (lambda: inject_peft(_bert(), method="lorax"), ValueError, "lorax"),
    "unknown_option": (lambda: inject_peft(_bert(), method="lora", rank=8), (TypeError, ValueError), "rank"),
}


CASES = {**POINT_CASES, **PROMPT_CASES, **DEFT_CASES, **PEFT_CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_a_clear_error(case):
    call, error, words = CASES[case]
    with pytest.raises(error, match=words):
        call()


def test_injecting_twice_is_refused():
    model = _bert()
    inject_peft(model, method="lora", r=4)
    with pytest.raises(TypeError, match="already a LoRALinear.*merge_and_unload"):
        inject_peft(model, method="lora", r=4)


def test_text_inputs(tmp_path):
    with pytest.raises(ValueError, match="max_length"):
        TextCollator(tokenizer=None, max_length=1)
    missing_column = tmp_path / "train.tsv"
    missing_column.write_text("sentence\nA fine film.\n")
    with pytest.raises(ValueError, match="label"):
        load_glue_tsv(missing_column, "sst2")
    bad_bytes = tmp_path / "dev.tsv"
    bad_bytes.write_bytes(b"sentence\tlabel\nA \xff\xfe film.\t1\n")
    with pytest.raises(ValueError, match="UTF-8|utf-8|decode"):
        load_glue_tsv(bad_bytes, "sst2")
    with pytest.raises(FileNotFoundError, match="download_glue|missing|not found|No such"):
        load_glue_tsv(tmp_path / "absent.tsv", "sst2")
    assert make_loader is not None


def test_memory_bank_files(tmp_path):
    from course_lib.point_peft import StaleMemoryBankError

    bank = _bank(torch.rand(4, 2))
    path = save_memory_bank(bank, tmp_path / "bank.pt")
    with pytest.raises(StaleMemoryBankError, match="rebuild|build_memory_bank"):
        load_memory_bank(path, encoder_sha256="1" * 64)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="rebuild|build_memory_bank|unreadable|corrupt"):
        load_memory_bank(truncated, encoder_sha256="0" * 64)
    with pytest.raises(FileNotFoundError):
        load_memory_bank(tmp_path / "absent.pt", encoder_sha256="0" * 64)
    assert build_memory_bank is not None


def test_checkpoint_files(tmp_path):
    from course_lib.points.checkpoint import default_checkpoint_path, load_pretrained_point_mae, read_checkpoint
    from course_lib.points.point_mae import PointMAEConfig

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="SHA256SUMS|hash|unlisted|sha256"):
        read_checkpoint(corrupt)  # unlisted: its hash cannot be checked
    with pytest.raises((ValueError, RuntimeError), match="corrupt|unreadable|not a|load"):
        read_checkpoint(corrupt, verify=False)
    if default_checkpoint_path().exists():
        wrong = PointMAEConfig(dim=96, depth=2, num_heads=4)  # not the shipped checkpoint's architecture
        with pytest.raises(ValueError, match="dim|shape|architecture|config"):
            load_pretrained_point_mae(config=wrong, progress=False)


def test_scanobjectnn_h5_without_the_dataset_key(tmp_path):
    h5py = pytest.importorskip("h5py")
    folder = tmp_path / "h5_files" / "main_split"
    folder.mkdir(parents=True)
    with h5py.File(folder / "training_objectdataset_augmentedrot_scale75.h5", "w") as h5:
        h5["points"] = np.zeros((2, 16, 3), dtype=np.float32)  # "data" and "label" are missing
    with pytest.raises(ValueError, match="'data' and 'label'"):
        load_scanobjectnn(tmp_path / "h5_files", "pb_t50_rs", "train")


def test_a_download_that_fails_halfway_leaves_nothing_trusted(tmp_path, monkeypatch):
    from course_lib import download

    payload = b"x" * 10_000

    class HalfResponse:
        status = 200
        headers = {"Content-Length": str(len(payload))}

        def __init__(self):
            self.sent = 0

        def read(self, size=-1):
            if self.sent >= 4_000:
                raise ConnectionResetError("connection dropped")
            self.sent += 4_000
            return payload[:4_000]

        def getcode(self):
            return 200

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: HalfResponse())
    dest = tmp_path / "modelnet40.zip"
    with pytest.raises((download.DownloadError, OSError), match="connection dropped|interrupted|reset"):
        download.download_file("https://example.invalid/modelnet40.zip", dest, sha256="0" * 64, progress=False)
    assert not dest.exists()  # only a verified file is ever renamed to its final name
    part = dest.with_name(dest.name + ".part")
    assert not part.exists() or part.stat().st_size == 4_000  # kept only to be resumed, then verified


def test_output_folders(tmp_path):
    blocked = tmp_path / "results"
    blocked.write_text("a file where the results folder should be")
    with pytest.raises(OSError):
        write_json(blocked / "deft.json", {"acc": 1.0})
    with pytest.raises(OSError, match="COURSE_CACHE_DIR"):
        RunCache("exp", root=blocked).run({"a": 1}, lambda: {"acc": 1.0})
    target = tmp_path / "ok" / "deft.json"
    with pytest.raises(TypeError):
        write_json(target, {"model": object()})
    assert not target.exists() and not list(target.parent.glob("*.tmp"))  # nothing half-written
    write_json(target, {"acc": 1.0})
    assert json.loads(target.read_text()) == {"acc": 1.0}
    assert Path(target).exists()
