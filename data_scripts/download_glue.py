"""Download GLUE tasks, verified by SHA-256, into <DATA_DIR>/glue/<TASK>/{train,dev,test}.tsv.

    python -m data_scripts.download_glue --tasks SST-2 CoLA MRPC RTE
    python -m data_scripts.download_glue --tasks all

Optional: the course runs offline on the generated review task (course_lib.text.task); the
real GLUE files are for learners who want to check the methods on a real benchmark. Without
network the script stops at once with a message saying so.

Sources and checksums: the files GLUE's own download script points to
(dl.fbaipublicfiles.com), with the SHA-256 sums and sizes pinned by Hugging Face datasets
(datasets/glue/dataset_infos.json, "download_checksums"); the same sums appear in
tensorflow_datasets' url_checksums/glue.txt for the older mirror of the same files. MRPC is
rebuilt as GLUE's script does it: Microsoft's training file split into train/dev by GLUE's
list of dev ids. Unlike GLUE's unlabeled MRPC test.tsv, the test.tsv written here is
Microsoft's labeled test file (same columns as train.tsv).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from course_lib import config
from course_lib.download import ChecksumError, DownloadError, download_file, extract_archive

OFFLINE_HINT = (
    "GLUE is optional: the notebooks run offline on the generated review task "
    "(course_lib.text.make_sentiment_task). Run this script again on a machine with network access."
)


@dataclass(frozen=True)
class Source:
    url: str
    sha256: str
    num_bytes: int

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_GLUE = "https://dl.fbaipublicfiles.com/glue/data/"
_SENTEVAL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/"

#: task -> the files to fetch (sha256 and size from Hugging Face datasets' glue dataset_infos.json)
TASKS: dict[str, tuple[Source, ...]] = {
    "CoLA": (Source(_GLUE + "CoLA.zip", "f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff", 376971),),
    "SST-2": (Source(_GLUE + "SST-2.zip", "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa", 7439277),),
    "MRPC": (
        Source(_SENTEVAL + "msr_paraphrase_train.txt", "60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89", 1047044),
        Source(_SENTEVAL + "msr_paraphrase_test.txt", "a04e271090879aaba6423d65b94950c089298587d9c084bf9cd7439bd785f784", 441275),
        Source(_GLUE + "mrpc_dev_ids.tsv", "971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7", 6222),
    ),
    "QQP": (Source(_GLUE + "QQP-clean.zip", "40e7c862c04eb26ee04b67fd900e76c45c6ba8e6d8fab4f8f1f8072a1a3fbae0", 41696084),),
    "STS-B": (Source(_GLUE + "STS-B.zip", "e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85", 802872),),
    "MNLI": (Source(_GLUE + "MNLI.zip", "e7c1d896d26ed6caf700110645df426cc2d8ebf02a5ab743d5a5c68ac1c83633", 312783507),),
    "QNLI": (Source(_GLUE + "QNLIv2.zip", "e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5", 10627589),),
    "RTE": (Source(_GLUE + "RTE.zip", "6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee", 697150),),
    "WNLI": (Source(_GLUE + "WNLI.zip", "ae0e8e4d16f4d46d4a0a566ec7ecceccfd3fbfaa4a7a4b4e02848c0f2561ac46", 28999),),
}


def glue_dir(data_dir: Path | None = None) -> Path:
    return (data_dir or config.DATA_DIR) / "glue"


def _task_name(name: str) -> str:
    key = name.replace("-", "").replace("_", "").lower()
    for task in TASKS:
        if task.replace("-", "").lower() == key:
            return task
    raise ValueError(f"unknown GLUE task {name!r}; choose from {', '.join(TASKS)} or 'all'")


def build_mrpc(train_file: Path, test_file: Path, dev_ids_file: Path, out_dir: Path) -> Path:
    """Write MRPC train.tsv / dev.tsv (split by GLUE's dev ids) and test.tsv into out_dir.

    Each file is written to a temporary name and renamed, and out_dir itself appears only when
    all three are complete.
    """
    dev_ids = {
        tuple(line.strip().split("\t")) for line in dev_ids_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()
    }
    lines = train_file.read_text(encoding="utf-8-sig").splitlines()
    header, rows = lines[0], [line for line in lines[1:] if line.strip()]
    train_rows, dev_rows = [], []
    for row in rows:
        fields = row.split("\t")
        if len(fields) != 5:
            raise ValueError(f"{train_file}: expected 5 tab-separated columns, got {len(fields)} in {row[:80]!r}")
        (dev_rows if (fields[1], fields[2]) in dev_ids else train_rows).append(row)
    test_lines = test_file.read_text(encoding="utf-8-sig").splitlines()
    staging = out_dir.with_name(f".{out_dir.name}.building")
    staging.mkdir(parents=True, exist_ok=True)
    for name, body in (("train.tsv", train_rows), ("dev.tsv", dev_rows), ("test.tsv", test_lines[1:])):
        (staging / name).write_text("\n".join([header, *body]) + "\n", encoding="utf-8")
    staging.replace(out_dir)
    return out_dir


def download_task(task: str, data_dir: Path | None = None, *, progress: bool = True, timeout: float = 10.0) -> Path:
    """Fetch and unpack one GLUE task into <data_dir>/glue/<task>; returns that folder.

    A task folder that already exists is kept as it is.
    """
    task = _task_name(task)
    root = glue_dir(data_dir)
    out_dir = root / task
    if out_dir.is_dir():
        return out_dir
    downloads = root / "downloads"
    files = [
        download_file(source.url, downloads / source.filename, source.sha256, progress=progress, timeout=timeout, offline_hint=OFFLINE_HINT)
        for source in TASKS[task]
    ]
    if task == "MRPC":
        return build_mrpc(files[0], files[1], files[2], out_dir)
    return extract_archive(files[0], out_dir, strip_top_level=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["SST-2"], help=f"tasks to fetch ({', '.join(TASKS)}) or 'all'")
    parser.add_argument("--data-dir", type=Path, default=None, help="defaults to course_lib.config.DATA_DIR")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the network (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        tasks = list(TASKS) if [t.lower() for t in args.tasks] == ["all"] else [_task_name(t) for t in args.tasks]
    except ValueError as error:
        parser.error(str(error))
    for task in tasks:
        try:
            folder = download_task(task, args.data_dir, progress=not args.no_progress, timeout=args.timeout)
        except (DownloadError, ChecksumError) as error:
            print(f"[glue] {task}: {error}", file=sys.stderr)
            return 1
        print(f"[glue] {task} ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
