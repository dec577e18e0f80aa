"""The seeds benchmarks' own logic, on made-up rows: benchmarks/deft_seeds.py's table and verdicts,
and the command line both seeds benchmarks share."""

from __future__ import annotations

import sys

import pytest

from benchmarks import deft_seeds
from benchmarks.common import seeds_arguments


def made_up_rows(seeds):
    # every run dense (density 1.0) and at 60% except: masked/lora with the loss halves the real-token
    # density and loses 0.5 points; paper/prefix with the loss collapses to chance (25%) on seed 1 only
    rows = []
    for seed in seeds:
        for protocol in deft_seeds.PROTOCOLS:
            for method in deft_seeds.METHODS:
                for weight in (0.0, 1.0):
                    density, acc = {"all": 1.0, "real": 1.0, "padding": 1.0}, 60.0 + seed
                    if weight and (protocol, method) == ("masked", "lora"):
                        density, acc = {"all": 0.8, "real": 0.5, "padding": 1.0}, acc - 0.5
                    if weight and (protocol, method, seed) == ("paper", "prefix", 1):
                        acc = 25.0
                    rows.append({"protocol": protocol, "method": method, "weight": weight, "seed": seed, "acc": acc,
                                 "density": density, "majority_share": 0.3})  # fmt: skip
    return rows


def test_the_table_and_verdicts_follow_the_runs():
    summary = deft_seeds.summarise(made_up_rows([0, 1, 2]), [0, 1, 2], num_labels=4)
    lora = summary["table"]["masked/lora"]
    assert lora["reduction"]["real"]["mean"] == pytest.approx(0.5) and lora["reduction"]["all"]["mean"] == pytest.approx(0.2)
    assert lora["accuracy_change_points"]["mean"] == pytest.approx(-0.5) and lora["acc"]["values"] == [60.0, 61.0, 62.0]
    assert summary["largest_reduction_all"] == "masked/lora"
    prefix = summary["table"]["paper/prefix"]
    assert prefix["collapsed_seeds"] == 1 and prefix["accuracy_change_points"]["mean"] < -1.0
    kept = summary["kept_accuracy_within_1_point"]
    assert "masked/lora" in kept and "paper/prefix" not in kept and kept["masked/lora"] == pytest.approx(0.5)


def test_a_seeds_benchmark_refuses_one_seed_or_no_worker(monkeypatch, capsys):
    for argv, message in ((["--seeds", "0"], "at least two different seeds"), (["--seeds", "1", "1"], "at least two different seeds"),
                          (["--workers", "0"], "--workers must be at least 1")):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["deft_seeds", *argv])
        with pytest.raises(SystemExit):
            seeds_arguments("test")
        assert message in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["deft_seeds", "--seeds", "3", "4", "--workers", "1"])
    args = seeds_arguments("test")
    assert args.seeds == [3, 4] and args.workers == 1
