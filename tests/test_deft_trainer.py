"""DEFT's density loss outside course_lib.train: `deft_compute_loss` gives DEFTLoss's value on a
Hugging Face style call, and examples/deft_with_trainer.py trains with `transformers.Trainer`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib.deft import DEFTLoss, deft_compute_loss
from course_lib.peft import inject_peft

transformers = pytest.importorskip("transformers")
REPO_ROOT = Path(__file__).resolve().parent.parent


def test_deft_compute_loss_equals_deft_loss():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=2)  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    inject_peft(model, "lora", r=4, target_modules=["query", "value"])
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 4:] = 0
    batch = {"input_ids": torch.randint(5, 100, (3, 7)), "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}
    loss, outputs = deft_compute_loss(model, batch, weight=0.5)
    expected, logits = DEFTLoss(weight=0.5)(model, batch)
    assert torch.allclose(loss, expected) and torch.equal(outputs.logits, logits)
    loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="no .loss"):
        deft_compute_loss(model, {"input_ids": batch["input_ids"]})


@pytest.mark.slow
def test_the_trainer_example_runs():
    pytest.importorskip("accelerate")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "deft_with_trainer.py")],
                            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 3 steps with Trainer" in result.stdout


def test_deft_config_round_trips_through_the_loss():
    from course_lib.deft import DEFTConfig

    config = DEFTConfig(weight=0.5, mask_padding=False, memory_efficient=True)
    loss = DEFTLoss.from_config(config)
    assert loss.config == config and loss.weight == 0.5 and not loss.mask_padding
    assert config.to_dict()["weight"] == 0.5
    with pytest.raises(ValueError, match="weight must be >= 0"):
        DEFTConfig(weight=-1.0)
