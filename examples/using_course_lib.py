"""The README's "Using course_lib in your own code", as one runnable file.

Every block between two `# --- README:` markers is a code block of README.md, character for
character (tests/test_readme_snippets.py checks it), so the README cannot drift from code that
runs. tests/test_wheel.py runs this file with a wheel of course_lib installed in a fresh virtual
environment (core dependencies only, no matplotlib, no open3d): what an engineer gets from
`pip install course_lib`. Offline: the models are small and randomly initialised here, where
your code would call `from_pretrained`.

    python examples/using_course_lib.py
"""

import tempfile
from pathlib import Path

import torch
import transformers

transformers.logging.set_verbosity_error()
torch.manual_seed(0)
workdir = Path(tempfile.mkdtemp())


def your_bert() -> transformers.PreTrainedModel:
    """Stands for AutoModelForSequenceClassification.from_pretrained(...) on your model: the same
    weights at every call."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def your_gpt2() -> transformers.PreTrainedModel:
    """Stands for AutoModelForCausalLM.from_pretrained("gpt2")."""
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=200, n_embd=64, n_layer=2, n_head=4)).eval()


batch = {"input_ids": torch.randint(5, 200, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long),
         "labels": torch.tensor([0, 1, 1, 0])}  # fmt: skip
model = your_bert()

# --- README: lora
from course_lib.peft import LoRAConfig, inject_peft

report = inject_peft(model, LoRAConfig(target_modules=["query", "value"], r=8, alpha=16))
print(report)  # which modules were wrapped, trainable / total parameters
# --- README: end
with torch.no_grad():  # as if trained: LoRA's B starts at zero
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            parameter.add_(0.1 * torch.randn_like(parameter))

# --- README: save
from course_lib.peft import load_adapter, merge_and_unload, save_adapter

save_adapter(model, workdir / "my-adapter")  # adapter_config.json + adapter_model.safetensors (peft's format)
base = your_bert()  # the same base model, freshly loaded
load_adapter(base, workdir / "my-adapter")  # injects LoRA and loads it; peft.PeftModel.from_pretrained reads it too
merged = merge_and_unload(model)  # returns the model, LoRA folded into its weights: save_pretrained works again
# --- README: end
with torch.no_grad():
    assert torch.allclose(base(**batch).logits, merged(**batch).logits, atol=1e-5)

# --- README: gpt2
gpt2 = your_gpt2()
inject_peft(gpt2, "lora", r=8, lora_alpha=16, target_modules=["c_attn"])  # Conv1D layers, peft's option names
# --- README: end
assert gpt2(input_ids=batch["input_ids"]).logits.isfinite().all()

# --- README: prefix
inject_peft(your_gpt2(), "prefix_tuning", num_virtual_tokens=20)  # or a DistilBERT, a Llama, ...
# --- README: end
prefixed = your_gpt2()
inject_peft(prefixed, "prefix_tuning", num_virtual_tokens=4)
assert prefixed(input_ids=batch["input_ids"]).logits.isfinite().all()

# --- README: deft
from course_lib.deft import DEFTLoss

model = your_bert()
inject_peft(model, "lora", target_modules=["query", "value"])
loss_fn = DEFTLoss(weight=1.0)  # loss_fn(model, batch) -> (task loss + w * density loss, logits)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for step in range(3):  # your own loop; course_lib.train.train(model, loader, loss_fn=loss_fn) also takes it
    loss, logits = loss_fn(model, batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

from course_lib.deft import SparsityConfig, sparsify_activations, with_sparse_second_projections

merge_and_unload(model.eval())  # the fine-tuned model, LoRA folded into its weights
report = sparsify_activations(model, [batch], SparsityConfig("threshold", target_density=0.13))  # your batches
fast = with_sparse_second_projections(model, "gather")  # batch-1 inference that skips W2's unused rows
# --- README: end
with torch.no_grad():
    one = {key: value[:1] for key, value in batch.items() if key != "labels"}
    assert torch.allclose(fast(**one).logits, model(**one).logits, atol=1e-4)

# --- README: meft
from course_lib.meft import MEFTConfig, meft, meft_from_hf

model = meft_from_hf(your_bert(), "meft1")  # a reversible copy: the backward pass recomputes activations
low_peak = meft_from_hf(your_bert(), "meft3", batch_chunks=4)  # F and G on 4 pieces of the batch: lower peak, same gradients
low_peak(**batch).loss.backward()
loss = model(**batch).loss
loss.backward()
decoder, report = meft(your_gpt2(), MEFTConfig("meft3"))  # GPT-2: causal LM loss, as the paper's OPT runs
decoder(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
# --- README: end

# --- README: point_peft
from torch.utils.data import TensorDataset

from course_lib.point_peft import PointPEFTConfig, build_memory_bank, point_peft
from course_lib.points.checkpoint import load_pretrained_point_mae

encoder = load_pretrained_point_mae(num_classes=15)  # the shipped tiny Point-MAE (package data, SHA-256 checked)
clouds, labels = torch.randn(32, 1024, 3), torch.randint(0, 15, (32,))  # your training shapes (S, N, 3)
train_set = TensorDataset(clouds, labels)
bank = build_memory_bank(encoder, train_set)  # one frozen feature per training shape
model, report = point_peft(encoder, PointPEFTConfig(), bank)
logits = model(clouds[:8], indices=torch.arange(8))  # training: a shape never retrieves its own bank row
# --- README: end
assert logits.shape == (8, 15)
print("all README snippets ran")
