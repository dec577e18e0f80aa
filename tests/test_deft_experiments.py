"""course_lib.deft.experiments: notebook 22's run as a library function, its run-cache key, and a
run read back from the cache with its trained weights (what notebook 22 and
benchmarks/deft_seeds.py share)."""

from __future__ import annotations

import pytest
import torch

from course_lib.deft import (
    build_deft_model,
    course_recipe,
    deft_run_key,
    train_deft_run,
)
from course_lib.run_cache import RunCache


@pytest.fixture(scope="module")
def tiny_setup():
    from transformers.utils import logging

    from course_lib.text import (
        load_classifier,
        load_tokenizer,
        make_loader,
        make_sentiment_task,
    )
    from course_lib.train import set_seed

    logging.set_verbosity_error()
    task = make_sentiment_task(8, 4, 8, seed=0)
    tokenizer = load_tokenizer()
    set_seed(0)
    return {
        "task": task, "tokenizer": tokenizer, "pretrained": load_classifier(task.num_labels),
        "test_loader": make_loader(task.test, tokenizer, batch_size=4),
        "density_loader": make_loader(task.test, tokenizer, batch_size=4, pad_to_max_length=True, max_length=32),
        "recipe": course_recipe(num_epochs=1, batch_size=4),
    }  # fmt: skip


def train_once(setup, seed=0, weight=1.0):
    return train_deft_run(setup["pretrained"], setup["recipe"], "lora", setup["task"].train, setup["tokenizer"],
                          test_loader=setup["test_loader"], density_loader=setup["density_loader"], weight=weight, seed=seed)  # fmt: skip


def test_a_run_is_reproducible_and_reports_the_three_measures(tiny_setup):
    row, model = train_once(tiny_setup)
    again, _ = train_once(tiny_setup)
    assert row["acc"] == again["acc"] and row["density"] == again["density"]  # same seed, same bits
    assert set(row["density"]) == {"all", "real", "padding"} and all(0 <= v <= 1 for v in row["density"].values())
    assert row["steps"] == 2 and row["weight"] == 1.0 and row["lr"] == tiny_setup["recipe"].lr["lora"]
    assert row["final_density_loss"] is not None and 0 < row["majority_share"] <= 1 and not model.training
    plain, _ = train_once(tiny_setup, weight=0.0)
    assert plain["final_density_loss"] is None  # weight 0: plain PEFT, no density loss
    with pytest.raises(KeyError, match="has no method 'ia3'"):
        build_deft_model(tiny_setup["pretrained"], tiny_setup["recipe"], "ia3")


def test_the_key_follows_what_decides_the_run(tiny_setup):
    task, recipe = tiny_setup["task"], tiny_setup["recipe"]

    def key(**changes):
        arguments = {"weight": 1.0, "lr": None, "seed": 0, "num_train": 8, "num_density": 8, **changes}
        return deft_run_key(task, recipe, "lora", **arguments)

    base = key()
    assert key() == base
    for changed in (key(weight=0.0), key(seed=1), key(lr=1e-3), key(num_density=4),
                    deft_run_key(task, course_recipe(num_epochs=2, batch_size=4), "lora", weight=1.0, lr=None, seed=0,
                                 num_train=8, num_density=8)):  # fmt: skip
        assert changed != base


def test_a_cached_run_comes_back_with_its_trained_weights(tiny_setup, tmp_path):
    setup, calls = tiny_setup, []

    def compute():
        calls.append(1)
        return train_once(setup)

    def rebuild():
        return build_deft_model(setup["pretrained"], setup["recipe"], "lora")

    row, trained = RunCache("deft", root=tmp_path).run_with_model({"run": 1}, compute, rebuild)
    row_again, reloaded = RunCache("deft", root=tmp_path).run_with_model({"run": 1}, compute, rebuild)
    assert len(calls) == 1 and row_again == row
    for (name, a), (_, b) in zip(trained.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(trained.get_submodule("classifier").weight, setup["pretrained"].get_submodule("classifier").weight)
