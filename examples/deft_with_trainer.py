"""DEFT's density loss in Hugging Face's `transformers.Trainer`: override `compute_loss`.

`course_lib.deft.deft_compute_loss(model, inputs, weight=w)` runs the forward pass inside an
`ActivationCollector` and returns (task loss + w * density loss, outputs); any loop that calls a
Hugging Face model with keyword inputs can use it. Here on a small random BERT with LoRA, three
steps (tests/test_deft_trainer.py runs this file). Needs `accelerate`, which Trainer requires.

    python examples/deft_with_trainer.py
"""

import tempfile

import torch
import transformers

from course_lib.deft import deft_compute_loss
from course_lib.deft import measure_density
from course_lib.peft import inject_peft


class DEFTTrainer(transformers.Trainer):
    """Trainer whose loss is the task loss + `deft_weight` * DEFT's density loss."""

    def __init__(self, *args, deft_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.deft_weight = deft_weight

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = deft_compute_loss(model, inputs, weight=self.deft_weight)
        return (loss, outputs) if return_outputs else loss


class RandomSentences(torch.utils.data.Dataset):
    def __init__(self, size: int = 32, length: int = 12) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 200, (size, length), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=2)  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    inject_peft(model, "lora", r=8, lora_alpha=16, target_modules=["query", "value"])
    data = RandomSentences()
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = transformers.TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=8,
                                                   learning_rate=1e-3, report_to=[], save_strategy="no",
                                                   logging_strategy="no", use_cpu=True, disable_tqdm=True)  # fmt: skip
        trainer = DEFTTrainer(model=model, args=arguments, train_dataset=data, deft_weight=1.0)
        result = trainer.train()
    batch = {key: torch.stack([data[i][key] for i in range(8)]) for key in ("input_ids", "attention_mask")}
    density = measure_density(model.eval(), [batch], mask_padding=True)
    print(f"trained {result.global_step} steps with Trainer, final loss {result.training_loss:.4f}, "
          f"MLP density {density.mean:.3f}")
