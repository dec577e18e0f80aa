"""Training on several processes with torch.distributed: what `course_lib.train` needs from it.

Under `torchrun --nproc-per-node N` every process runs the same script; after
`torch.distributed.init_process_group` (gloo on the CPU, nccl on GPUs) `course_lib.train.train`
notices the process group and

- gives each rank its shard of the training set (`shard_training_loader`: a `DistributedSampler`
  with the run's seed, its epoch advanced every epoch), so the N ranks together see one global
  batch of N x batch_size examples per step;
- wraps the model in `DistributedDataParallel`, which averages the gradients over the ranks in
  backward: every rank then takes the same optimizer step, and the weights stay identical (equal
  to one process training on the same global batches, up to float rounding: a mean of N means
  over equal-sized shards is the mean over the global batch);
- evaluates each rank on its own slice of the evaluation set and adds up correct answers, losses
  and counts over the ranks (`shard_evaluation_loader`, `sum_over_ranks`);
- shows progress and writes results on rank 0 only.

Nothing changes in one process: `rank_and_world()` is (0, 1) without a process group.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb (the loop); the process-group pieces
are standard torch.distributed, used as documented.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["rank_and_world", "shard_evaluation_loader", "shard_training_loader", "sum_over_ranks"]


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless a process group is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _loader_options(loader: DataLoader) -> dict[str, Any]:
    return {
        "batch_size": loader.batch_size,
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
    }


def _require_dataloader(loader: Any, what: str) -> DataLoader:
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise TypeError(
            f"under torch.distributed, train needs the {what} as a torch DataLoader with a batch_size, to give each "
            f"rank its shard (got {type(loader).__name__}); pass a DataLoader, or one whose sampler is already a "
            "DistributedSampler"
        )
    return loader


def shard_training_loader(loader: DataLoader, *, seed: int, rank: int, world: int) -> DataLoader:
    """The same loader over this rank's shard: a `DistributedSampler` (shuffled with `seed` if the
    loader shuffles; call `.sampler.set_epoch(epoch)` each epoch). A loader that already has a
    `DistributedSampler` is returned as it is.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        return loader
    loader = _require_dataloader(loader, "training loader")
    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=loader.drop_last)  # fmt: skip
    return DataLoader(loader.dataset, sampler=sampler, **_loader_options(loader))


def shard_evaluation_loader(loader: DataLoader, *, rank: int, world: int) -> DataLoader:
    """This rank's slice of an evaluation loader: examples rank, rank + world, ... in order, each
    example on exactly one rank (no padding, unlike `DistributedSampler`), so sums over the ranks
    are sums over the evaluation set.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    loader = _require_dataloader(loader, "evaluation loader")
    indices = list(range(rank, len(loader.dataset), world))  # type: ignore[arg-type]
    return DataLoader(Subset(loader.dataset, indices), shuffle=False, **_loader_options(loader))


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over all ranks (float64 all-reduce); the values themselves in one process."""
    _, world = rank_and_world()
    if world == 1:
        return [float(v) for v in values]
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    total = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return [float(v) for v in total.tolist()]
