"""Reading GLUE-format TSV files into a TextSplit.

GLUE ships each task as tab-separated files in its own layout: SST-2 has a header
`sentence<TAB>label`, CoLA has no header and four columns (source, label, original
annotation, sentence), MRPC names its columns `Quality`, `#1 String`, `#2 String`, RTE and
QNLI give text labels ("entailment" / "not_entailment")... A `TsvFormat` says where the text,
the optional second text and the label are; `GLUE_FORMATS` holds the formats of the tasks.
Fields are split on tabs with no quoting, as the GLUE reference code reads them.

Download the real files with `python -m data_scripts.download_glue --tasks SST-2`.

Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from course_lib.text.data import TextSplit

__all__ = ["TsvFormat", "GLUE_FORMATS", "glue_format", "load_glue_tsv"]


@dataclass(frozen=True)
class TsvFormat:
    """Where a TSV file keeps its text(s) and label.

    Columns are header names (`header=True`) or 0-based indices. `label_values[i]` is the
    string the file uses for class i (default "0", "1", ...), `label_names[i]` its name.
    """

    text_column: str | int
    label_column: str | int
    label_names: tuple[str, ...]
    text_pair_column: str | int | None = None
    header: bool = True
    label_values: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        columns = [c for c in (self.text_column, self.label_column, self.text_pair_column) if c is not None]
        if not self.header and not all(isinstance(c, int) for c in columns):
            raise ValueError("a file without header needs integer column indices")
        if self.label_values is not None and len(self.label_values) != len(self.label_names):
            raise ValueError("label_values and label_names must have the same length")

    @property
    def values(self) -> tuple[str, ...]:
        return self.label_values if self.label_values is not None else tuple(str(i) for i in range(len(self.label_names)))


_NLI2 = ("entailment", "not_entailment")

#: The formats of the GLUE train/dev files (test files have no labels).
GLUE_FORMATS: dict[str, TsvFormat] = {
    "SST-2": TsvFormat("sentence", "label", ("negative", "positive")),
    "CoLA": TsvFormat(3, 1, ("unacceptable", "acceptable"), header=False),
    "MRPC": TsvFormat("#1 String", "Quality", ("not_equivalent", "equivalent"), text_pair_column="#2 String"),
    "RTE": TsvFormat("sentence1", "label", _NLI2, text_pair_column="sentence2", label_values=_NLI2),
    "QNLI": TsvFormat("question", "label", _NLI2, text_pair_column="sentence", label_values=_NLI2),
    "WNLI": TsvFormat("sentence1", "label", ("not_entailment", "entailment"), text_pair_column="sentence2"),
    "QQP": TsvFormat("question1", "is_duplicate", ("not_duplicate", "duplicate"), text_pair_column="question2"),
    "MNLI": TsvFormat(
        "sentence1", "gold_label", ("entailment", "neutral", "contradiction"), text_pair_column="sentence2",
        label_values=("entailment", "neutral", "contradiction"),
    ),
}


def glue_format(task: str) -> TsvFormat:
    """The TsvFormat of a GLUE task, by name ("SST-2", "sst2", "cola", ...)."""
    key = task.replace("-", "").replace("_", "").lower()
    for name, spec in GLUE_FORMATS.items():
        if name.replace("-", "").lower() == key:
            return spec
    raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_FORMATS)}, or pass a TsvFormat")


def _column_index(column: str | int, header: list[str] | None, path: Path) -> int:
    if isinstance(column, int):
        return column
    assert header is not None
    if column not in header:
        raise ValueError(
            f"{path} has no column {column!r}; its header is {header}. "
            "Is it the right task? (GLUE test files carry no labels; use train.tsv or dev.tsv)"
        )
    return header.index(column)


def load_glue_tsv(path: str | os.PathLike, task: str | TsvFormat, *, limit: int | None = None) -> TextSplit:
    """Read a GLUE-format TSV file (train.tsv / dev.tsv) into a TextSplit.

    `task` is a GLUE task name (see `GLUE_FORMATS`) or a `TsvFormat` for any other file.
    `limit` keeps the first `limit` examples. Missing files, missing columns, short rows and
    unknown labels raise errors that name the file and line.

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    path = Path(path)
    spec = glue_format(task) if isinstance(task, str) else task
    if not isinstance(spec, TsvFormat):
        raise TypeError(f"task must be a GLUE task name or a TsvFormat, got {type(task).__name__}")
    if not path.is_file():
        raise FileNotFoundError(
            f"no TSV file at {path}. Download GLUE with `python -m data_scripts.download_glue --tasks "
            f"{task if isinstance(task, str) else '<TASK>'}`, or use the generated task "
            "course_lib.text.make_sentiment_task() offline"
        )
    with open(path, encoding="utf-8-sig", newline="") as handle:
        lines = [line.rstrip("\r\n") for line in handle]
    lines_with_numbers = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    header = None
    if spec.header:
        if not lines_with_numbers:
            raise ValueError(f"{path} is empty; expected a header line")
        header = lines_with_numbers.pop(0)[1].split("\t")
    text_index = _column_index(spec.text_column, header, path)
    label_index = _column_index(spec.label_column, header, path)
    pair_index = None if spec.text_pair_column is None else _column_index(spec.text_pair_column, header, path)
    needed = max(i for i in (text_index, label_index, pair_index) if i is not None) + 1
    label_of = {value: i for i, value in enumerate(spec.values)}

    texts, pairs, labels = [], [], []
    for number, line in lines_with_numbers:
        if limit is not None and len(texts) >= limit:
            break
        fields = line.split("\t")
        if len(fields) < needed:
            raise ValueError(f"{path}, line {number}: {len(fields)} tab-separated columns, expected at least {needed}")
        value = fields[label_index].strip()
        if value not in label_of:
            raise ValueError(f"{path}, line {number}: label {value!r} is not one of {list(spec.values)}")
        texts.append(fields[text_index])
        labels.append(label_of[value])
        if pair_index is not None:
            pairs.append(fields[pair_index])
    if not texts:
        raise ValueError(f"{path} holds no examples")
    return TextSplit(texts, labels, spec.label_names, text_pairs=pairs if pair_index is not None else None)
