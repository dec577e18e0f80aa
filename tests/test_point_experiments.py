"""Tests of course_lib.point_peft.experiments: each setting trains what it says, runs end to end,
and the summary's mean and std are those of the rows (checked against the statistics module)."""

from __future__ import annotations

import statistics

import pytest
import torch

from course_lib.point_peft.experiments import (
    SETTINGS,
    PointRecipe,
    SettingRun,
    build_setting,
    run_setting,
    run_settings,
    summarize,
    tiny_point_peft_config,
)
from course_lib.points.checkpoint import default_checkpoint_path
from course_lib.points.datasets import load_shapes
from course_lib.points.point_mae import PointMAEConfig

pytestmark = pytest.mark.skipif(not default_checkpoint_path().exists(), reason="no shipped checkpoint")

TINY_RECIPE = PointRecipe(train_per_class=2, test_per_class=1, head_epochs=1, num_epochs=1, batch_size=8,
                          activation_batch=4)  # fmt: skip


@pytest.fixture(scope="module")
def model_config() -> PointMAEConfig:
    from course_lib.point_peft.experiments import recipe_model_config

    return recipe_model_config(TINY_RECIPE, 15)


@pytest.fixture(scope="module")
def bank_set():
    return load_shapes("pb_t50_rs", "train", num_points=1024, max_per_class=2)


@pytest.mark.parametrize("setting", SETTINGS)
def test_each_setting_trains_what_it_says(setting, model_config, bank_set):
    model, info = build_setting(SettingRun(setting, 0, TINY_RECIPE), model_config, bank_set)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if setting in ("from_scratch", "full_finetune"):
        assert info["trainable"] == info["total"] == counted
    elif setting == "linear_probe":
        assert info["trainable"] == 128 * 15 + 15  # W (C x classes) and b on frozen features
    elif setting == "lora":
        assert trained and all("lora_" in n or n.startswith(("head.", "cls_", "norm.")) for n in trained)
        assert any(".attention.query.lora_A" in n for n in trained) and not any(".key." in n for n in trained)
        assert info["trainable"] == counted
    else:
        assert info["trainable"] == model.report().trainable == counted
        assert not any(n.startswith("query_encoder.") for n in trained)
    if setting == "point_peft":
        assert 100 * info["trainable"] / info["total"] <= 5.0  # the goal for the tiny backbone
        assert info["uses_indices"]


def test_bank_query_in_training_uses_the_shapes_own_rows(model_config, bank_set):
    run = SettingRun("point_peft", 0, TINY_RECIPE)
    model, _ = build_setting(run, model_config, bank_set)
    points = torch.stack([bank_set[i][0] for i in range(4)])  # (4, N, 3)
    indices = torch.arange(4)
    # the bank rows are the frozen query encoder's features of the un-augmented shapes
    assert torch.allclose(model.bank_features[indices], model.query_encoder.pooled_features(points), atol=1e-4)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the frozen query encoder ran")

    model.query_encoder.pooled_features = must_not_run
    model.train()
    assert model(points, indices=indices).shape == (4, 15)  # training with indices: rows from the bank
    model.eval()
    with pytest.raises(AssertionError, match="query encoder ran"):
        model(points)  # test shapes are not in the bank: their query is computed
    assert tiny_point_peft_config().bank_query_in_training


def test_tiny_config_adapters_start_at_the_pretrained_features(model_config, bank_set):
    """adapter_only with the tiny config: the wrapped model's first forward is the pretrained encoder's."""
    model, _ = build_setting(SettingRun("adapter_only", 0, TINY_RECIPE), model_config, bank_set)
    points = torch.stack([bank_set[i][0] for i in range(4)])  # (4, N, 3)
    with torch.no_grad():
        expected, _ = model.encoder.forward_features(points)  # the frozen encoder, without the adapters
        torch.testing.assert_close(model.eval().forward_features(points), expected)
    official, _ = build_setting(SettingRun("adapter_only", 0, TINY_RECIPE, tiny_point_peft_config(zero_init=False)),
                                model_config, bank_set)  # fmt: skip
    with torch.no_grad():
        assert not torch.allclose(official.eval().forward_features(points), expected, atol=1e-3)


def test_run_setting_end_to_end_and_summary():
    row = run_setting(SettingRun("point_peft", 0, TINY_RECIPE))
    assert 0.0 <= row["acc"] <= 1.0 and row["trainable_pct"] <= 5.0
    assert row["activation_mib"] > 0 and row["sec_per_epoch"] > 0 and len(row["train_loss"]) == 2
    rows = [dict(row, seed=s, acc=a) for s, a in ((0, 0.2), (1, 0.4), (2, 0.9))]
    table = summarize(rows)["point_peft"]
    assert table["acc_mean"] == pytest.approx(statistics.mean([0.2, 0.4, 0.9]))
    assert table["acc_std"] == pytest.approx(statistics.stdev([0.2, 0.4, 0.9]))
    assert table["seeds"] == [0, 1, 2]


def test_a_reversible_setting_runs_end_to_end_and_saves_less_than_lora():
    reversible = run_setting(SettingRun("meft", 0, TINY_RECIPE))
    lora = run_setting(SettingRun("lora", 0, TINY_RECIPE))
    assert 0.0 <= reversible["acc"] <= 1.0 and len(reversible["train_loss"]) == 2
    assert 0 < reversible["activation_mib"] < lora["activation_mib"]
    assert reversible["trainable_pct"] < 5.0  # adapters, CLS token, final norm and head
    with pytest.raises(ValueError, match="unknown setting 'meft1'"):
        SettingRun("meft1")  # the variant goes in SettingRun.meft


def test_precomputed_queries_give_the_same_logits_as_the_query_encoder(model_config, bank_set):
    """run_setting hands the model its retrieval queries (bank rows for the plain training set, the
    test set encoded once); the logits must be those of the model computing them itself."""
    from course_lib.points.point_mae import extract_features

    model, _ = build_setting(SettingRun("point_peft", 0, TINY_RECIPE), model_config, bank_set)
    model.eval()
    points = torch.stack([bank_set[i][0] for i in range(6)])  # (6, N, 3)
    indices = torch.arange(6)
    encoded, _ = extract_features(model.query_encoder, bank_set, batch_size=4)  # (S, C), batched differently
    with torch.no_grad():
        computed = model(points, indices=indices)  # eval mode: the query encoder runs
        from_bank = model(points, indices=indices, query_features=model.bank_features[indices])
        from_encoded = model(points, indices=indices, query_features=encoded[indices])
    torch.testing.assert_close(from_bank, computed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_encoded, computed, atol=1e-5, rtol=1e-5)


def test_running_stats_accuracy_is_measured_only_when_asked():
    import dataclasses

    asked = run_setting(SettingRun("lora", 0, TINY_RECIPE))
    assert 0.0 <= asked["acc_running_bn_stats"] <= 1.0
    not_asked = run_setting(SettingRun("lora", 0, dataclasses.replace(TINY_RECIPE, running_stats_accuracy=False)))
    assert "acc_running_bn_stats" not in not_asked
    assert not_asked["acc"] == asked["acc"]  # the same seeded run, tested once instead of twice
    no_precise = run_setting(SettingRun("lora", 0, dataclasses.replace(TINY_RECIPE, precise_batch_norm=False)))
    assert no_precise["acc"] == no_precise["acc_running_bn_stats"]


def test_runs_in_worker_processes_equal_runs_here():
    runs = [SettingRun("linear_probe", seed, TINY_RECIPE) for seed in (0, 1)]
    here = run_settings(runs, workers=1, progress=False)
    there = run_settings(runs, workers=2, progress=False)
    assert [r["acc"] for r in here] == [r["acc"] for r in there]
    assert [r["seed"] for r in there] == [0, 1]


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown setting"):
        SettingRun("prefix", 0)
    with pytest.raises(ValueError, match="unknown shape variant"):
        PointRecipe(variant="scanobjectnn")
    with pytest.raises(ValueError, match="workers"):
        run_settings([], workers=0)


def test_fit_head_on_features_trains_only_the_head_and_lowers_the_loss(model_config, bank_set):
    from course_lib.point_peft.experiments import fit_head_on_features

    model, _ = build_setting(SettingRun("full_finetune", 0, TINY_RECIPE), model_config, bank_set)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = fit_head_on_features(model, bank_set, epochs=15, lr=3e-3, weight_decay=0.0, batch_size=10)
    assert losses[-1] < losses[0]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("head.") for name in changed)
