"""One course training on N processes: LoRA (or any `inject_peft` method) on MiniLM, with
`course_lib.train.train` under torchrun.

    make train-distributed                          # 2 processes on this CPU (gloo)
    .venv/bin/torchrun --standalone --nproc-per-node 2 scripts/train_distributed.py --epochs 2
    .venv/bin/torchrun --standalone --nproc-per-node 4 scripts/train_distributed.py --glue SST-2   # 4 GPUs (nccl), real data

Each process trains on its shard of the training set (batch `--batch-size` per process, so the
global batch is N times that), DistributedDataParallel averages the gradients, rank 0 prints
the evaluation and writes results/distributed_<method>.json. On GPUs the backend is nccl and
each process takes the GPU of its LOCAL_RANK; on the CPU gloo, one thread per process. With
`--glue TASK` the data are GLUE's TSV files under <DATA_DIR>/glue/TASK (download them first:
`python -m data_scripts.download_glue --tasks TASK`); by default the embedded review task.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description="course_lib.train on N processes (run it with torchrun)")
    parser.add_argument("--method", default="lora", help="an inject_peft method (lora, adapter, ia3, bitfit, ...)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--num-train", type=int, default=1280, help="examples of the generated task")
    parser.add_argument("--glue", default=None, help="a GLUE task (e.g. SST-2) instead of the generated task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("run this script with torchrun, e.g. `torchrun --standalone --nproc-per-node 2 "
                         "scripts/train_distributed.py` (make train-distributed)")  # fmt: skip

    from transformers.utils import logging as hf_logging

    from course_lib import config
    from course_lib.distributed import rank_and_world
    from course_lib.peft import inject_peft
    from course_lib.results import results_path
    from course_lib.text import (
        load_classifier,
        load_tokenizer,
        make_loader,
        make_sentiment_task,
    )
    from course_lib.train import set_seed, train

    hf_logging.set_verbosity_error()  # the fresh classifier head's load report, once per process
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(1)  # one core per process
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = rank_and_world()
    try:
        if args.glue:
            from course_lib.text.glue import glue_format, load_glue_tsv

            folder = config.DATA_DIR / "glue" / args.glue
            train_split, test_split = (load_glue_tsv(folder / f"{name}.tsv", args.glue) for name in ("train", "dev"))
            num_labels = len(glue_format(args.glue).label_names)
        else:
            task = make_sentiment_task(args.num_train, 32, 500, seed=args.seed)
            train_split, test_split, num_labels = task.train, task.test, task.num_labels
        tokenizer = load_tokenizer()
        set_seed(args.seed)
        model = load_classifier(num_labels)
        report = inject_peft(model, args.method)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        train_loader = make_loader(train_split, tokenizer, batch_size=args.batch_size, shuffle=True, seed=args.seed)
        test_loader = make_loader(test_split, tokenizer, batch_size=128)
        start = time.perf_counter()
        history = train(model, train_loader, eval_loader=test_loader, num_epochs=args.epochs, lr=args.lr,
                        warmup_ratio=0.1, seed=args.seed, device=device,
                        results_path=results_path(f"distributed_{args.method}"))  # fmt: skip
        if rank == 0:
            print(f"{world} processes ({'nccl' if cuda else 'gloo'}), {args.method}: {report.trainable:,} trained parameters, "
                  f"{history.num_steps} steps of {world} x {args.batch_size}, {time.perf_counter() - start:.0f} s; "
                  f"test accuracy per epoch {[round(a, 3) for a in history.eval_accuracy]}; median step "
                  f"{history.seconds_per_step:.3f} s")  # fmt: skip
            print(f"RESULT world={world} batch={args.batch_size} step_s={history.seconds_per_step!r}", flush=True)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
