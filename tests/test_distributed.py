"""course_lib.train under torchrun: two processes on the CPU (gloo, loopback only, bounded time)
end with identical weights, equal to one process training on the same global batches; the
evaluation covers the whole set on every rank; only rank 0 writes results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from course_lib.distributed import (
    rank_and_world,
    shard_evaluation_loader,
    shard_training_loader,
)
from course_lib.train import evaluate, set_seed, train

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED, EPOCHS, PER_RANK_BATCH, WORLD = 0, 3, 4, 2


def make_data() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes
    return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])


def make_model() -> nn.Module:
    set_seed(SEED)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


WORKER = textwrap.dedent(
    f"""
    import json, sys, torch
    from pathlib import Path
    from torch.utils.data import DataLoader
    sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
    from test_distributed import EPOCHS, PER_RANK_BATCH, SEED, make_data, make_model
    from course_lib.distributed import rank_and_world
    from course_lib.train import evaluate, train

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = rank_and_world()
    out = Path(sys.argv[1])
    train_set, test_set = make_data()
    model = make_model()
    loader = DataLoader(train_set, batch_size=PER_RANK_BATCH, shuffle=True)
    results = out / ("history.json" if rank == 0 else f"rank{{rank}}/history.json")
    history = train(model, loader, num_epochs=EPOCHS, lr=1e-2, warmup_ratio=0.1, seed=SEED, progress=False,
                    results_path=results)
    metrics = evaluate(model, DataLoader(test_set, batch_size=3))
    torch.save({{k: v.clone() for k, v in model.state_dict().items()}}, out / f"weights{{rank}}.pt")
    (out / f"run{{rank}}.json").write_text(json.dumps({{"world": world, "losses": history.step_losses, "eval": metrics,
                                                      "config": history.config}}))
    torch.distributed.destroy_process_group()
    """
)


class _GlobalBatches:
    """The global batches of a 2-rank run, epoch after epoch: rank 0's and rank 1's batch t together."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.samplers = [DistributedSampler(dataset, num_replicas=WORLD, rank=r, shuffle=True, seed=SEED) for r in range(WORLD)]
        self.epoch = 0

    def __iter__(self):
        shards = []
        for sampler in self.samplers:
            sampler.set_epoch(self.epoch)
            shards.append(list(sampler))
        self.epoch += 1
        for start in range(0, len(shards[0]), PER_RANK_BATCH):
            yield [i for shard in shards for i in shard[start : start + PER_RANK_BATCH]]

    def __len__(self) -> int:
        return len(self.samplers[0]) // PER_RANK_BATCH


@pytest.mark.slow
def test_two_ranks_keep_identical_weights_equal_to_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", str(script), str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"weights{r}.pt") for r in range(WORLD)]
    runs = [json.loads((tmp_path / f"run{r}.json").read_text()) for r in range(WORLD)]
    assert all(run["world"] == WORLD and run["config"]["world_size"] == WORLD for run in runs)
    for name in ranks[0]:  # the ranks never drift apart: DDP averages the gradients
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert runs[0]["losses"] == runs[1]["losses"]  # the step loss is averaged over the ranks
    assert (tmp_path / "history.json").exists() and not (tmp_path / "rank1").exists()  # rank 0 writes

    # one process on the same global batches (8 examples a step) ends with the same weights
    train_set, test_set = make_data()
    reference = make_model()
    global_loader = DataLoader(train_set, batch_sampler=_GlobalBatches(train_set))
    history = train(reference, global_loader, num_epochs=EPOCHS, lr=1e-2, warmup_ratio=0.1, seed=SEED, progress=False)
    for name, value in reference.state_dict().items():
        assert torch.allclose(ranks[0][name], value, atol=1e-6), name
    assert runs[0]["losses"] == pytest.approx(history.step_losses, abs=1e-6)
    whole = evaluate(reference, DataLoader(test_set, batch_size=3))  # every rank reports the whole test set
    assert runs[0]["eval"]["num_examples"] == runs[1]["eval"]["num_examples"] == len(test_set)
    assert runs[0]["eval"]["accuracy"] == whole["accuracy"] and runs[0]["eval"]["loss"] == pytest.approx(whole["loss"], abs=1e-6)


def test_sharding_without_a_process_group():
    assert rank_and_world() == (0, 1)
    train_set, test_set = make_data()
    shards = [shard_training_loader(DataLoader(train_set, batch_size=4, shuffle=True), seed=3, rank=r, world=2) for r in range(2)]
    seen = [i for shard in shards for i in shard.sampler]
    assert sorted(seen) == list(range(len(train_set)))  # 32 examples, 16 each, none twice
    assert isinstance(shards[0].sampler, DistributedSampler) and shards[0].batch_size == 4
    slices = [shard_evaluation_loader(DataLoader(test_set, batch_size=3), rank=r, world=3) for r in range(3)]
    assert sorted(i for s in slices for i in s.dataset.indices) == list(range(len(test_set)))  # no padding
    with pytest.raises(TypeError, match="needs the training loader as a torch DataLoader"):
        shard_training_loader([(torch.zeros(1, 8), torch.zeros(1))], seed=0, rank=0, world=2)


@pytest.mark.slow
def test_the_distributed_training_script_runs_a_course_training_on_two_processes():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), COURSE_FAST="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(REPO_ROOT / "scripts" / "train_distributed.py"), "--num-train", "64", "--epochs", "1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1 and "world=2" in results[0]  # rank 0 alone reports
    alone = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train_distributed.py")], cwd=REPO_ROOT,
                           env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert alone.returncode != 0 and "run this script with torchrun" in alone.stderr
