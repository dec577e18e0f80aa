"""One shape for every method (course_lib's package docstring): `get_peft_model(model, config)`
returns (model to train, PEFTReport) for the PEFT methods, Point-PEFT and MEFT; the report's
fields mean the same everywhere; in place except MEFT; a method of your own can be registered."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import course_lib
from course_lib.meft import MEFTConfig
from course_lib.peft import (
    IA3Config,
    InjectionReport,
    LoRAConfig,
    inject_peft,
    register_peft_method,
)
from course_lib.point_peft import PointPEFTConfig, PointPEFTReport
from course_lib.points.point_mae import PointMAEConfig, PointMAEEncoder
from course_lib.report import PEFTReport

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def _counted(model: nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("config", [LoRAConfig(r=4, target_modules=["query"]), IA3Config()], ids=["lora", "ia3"])
def test_peft_methods_in_place(bert, config):
    model = copy.deepcopy(bert)
    returned, report = course_lib.get_peft_model(model, config)
    assert returned is model and report.in_place and isinstance(report, InjectionReport)
    assert (report.trainable, report.total) == _counted(model)
    assert report.trainable == sum(report.parts.values())
    assert report.method == config.method and report.config is config
    json.dumps(report.to_dict())  # JSON-ready


def test_meft_builds_a_new_model_and_leaves_the_old_one(bert):
    model = copy.deepcopy(bert)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    returned, report = course_lib.get_peft_model(model, MEFTConfig("meft2"))
    assert returned is not model and not report.in_place and report.method == "meft2"
    assert (report.trainable, report.total) == _counted(returned)
    assert set(report.parts) == {"adapters", "classifier"} and report.trainable == sum(report.parts.values())
    assert returned.meft_config == MEFTConfig("meft2")
    assert all(torch.equal(p, before[n]) and p.requires_grad == flags[n] for n, p in model.named_parameters())
    json.dumps(report.to_dict())


def test_point_peft_wraps_in_place():
    encoder = PointMAEEncoder(PointMAEConfig(num_classes=4))
    returned, report = course_lib.get_peft_model(encoder, PointPEFTConfig(use_memory_bank=False))
    assert isinstance(report, PointPEFTReport) and isinstance(report, PEFTReport) and report.in_place
    assert returned.encoder is encoder and report.method == "point_peft"
    assert report.per_part == report.parts and report.trainable == sum(report.parts.values())
    assert not any(p.requires_grad for n, p in encoder.named_parameters() if n.startswith("blocks.") and n.endswith("weight"))


def test_unknown_configs_and_inputs_are_refused(bert):
    with pytest.raises(TypeError, match="not the config of a known method.*MEFTConfig"):
        course_lib.get_peft_model(copy.deepcopy(bert), {"r": 8})
    with pytest.raises(TypeError, match="memory_bank"):
        course_lib.get_peft_model(PointMAEEncoder(PointMAEConfig()), PointPEFTConfig(), bank=None)
    with pytest.raises(ValueError, match="unknown MEFT variant"):
        MEFTConfig("meft9")


def test_a_method_of_your_own_can_be_registered(bert):
    @dataclass
    class ScaleOutputConfig:
        target_modules: list
        method = "scale_output"

    class ScaleOutput(nn.Module):
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base, self.scale = base, nn.Parameter(torch.ones(base.out_features))

        def forward(self, x):
            return self.base(x) * self.scale

    def apply(model, config):
        names = course_lib.peft.matching_module_names(model, config.target_modules, module_type=nn.Linear)
        wrappers = []
        for name in names:
            parent, _, child = name.rpartition(".")
            wrappers.append(ScaleOutput(model.get_submodule(name)))
            setattr(model.get_submodule(parent), child, wrappers[-1])
        return names, [w.scale for w in wrappers]

    register_peft_method(ScaleOutputConfig, apply)
    try:
        model = copy.deepcopy(bert)
        report = inject_peft(model, "scale_output", target_modules=["value"])
        assert len(report.changed) == 2 and report.trainable == 2 * 32 + 32 * 2 + 2  # scales + classifier
    finally:  # leave the registry as the other tests expect it
        course_lib.peft.PEFT_METHODS.pop(ScaleOutputConfig)
        course_lib.peft.METHODS.pop("scale_output")
