"""Seeded trainings reproduce bit for bit: the same fast-mode training in two fresh processes
(different hash seeds, so any set/dict-order dependence would show) gives the same losses and
the same trained weights, to the last bit, whichever order the methods run in (a notebook that
resumes from its run cache trains only the runs that had not finished, so a run must not depend on
what trained before it in the same process: each builds its own shuffled loader, whose order starts
from the seed). Notebooks 02, 22, 23 and 32 train this way; notebook 16's
point-cloud runs are compared the same way (tests/test_point_experiments.py compares a worker
process with the kernel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

TRAINING = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    warnings.filterwarnings("ignore")
    from transformers.utils import logging
    logging.set_verbosity_error()
    from course_lib.meft import build_method
    from course_lib.text import load_classifier, load_tokenizer, make_loader, make_sentiment_task
    from course_lib.train import set_seed, train

    torch.set_num_threads(1)   # as every training notebook does
    task = make_sentiment_task(48, 8, 8, seed=0)
    tokenizer = load_tokenizer()
    set_seed(0)
    pretrained = load_classifier(task.num_labels).eval()
    out = {}
    for method in sys.argv[1:]:
        set_seed(0)
        model = build_method(method, pretrained)
        loader = make_loader(task.train, tokenizer, batch_size=16, shuffle=True, seed=0)   # one per run
        history = train(model, loader, num_epochs=2, lr=1e-2, warmup_ratio=0.1, seed=0, progress=False)
        weights = [p.detach().double().sum().item() for p in model.parameters() if p.requires_grad]
        out[method] = {"loss": [float(x).hex() for x in history.train_loss], "weights": [w.hex() for w in weights]}
    print("RESULT " + json.dumps(out))
    """
)


def _train_in_fresh_process(hash_seed: str, methods: tuple[str, ...]) -> dict:
    env = dict(os.environ, COURSE_FAST="1", PYTHONHASHSEED=hash_seed)
    done = subprocess.run([sys.executable, "-c", TRAINING, *methods], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow
def test_the_same_seeded_training_twice_is_bit_identical_in_either_order():
    first = _train_in_fresh_process("1", ("lora", "meft2"))
    second = _train_in_fresh_process("2", ("meft2", "lora"))
    assert set(first) == {"lora", "meft2"}
    for method in first:
        assert first[method]["loss"] == second[method]["loss"], method
        assert first[method]["weights"] == second[method]["weights"], method
