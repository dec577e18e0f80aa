"""Text side of the course: the packaged MiniLM, the generated task, GLUE-format files.

- `load_tokenizer`, `load_encoder`, `load_classifier`  MiniLM (or any HF name/path), offline (models.py)
- `make_sentiment_task`                                the generated 4-class review task (task.py)
- `TextSplit`, `make_loader`                           texts + labels, and tokenized batches (data.py)
- `load_glue_tsv`                                      GLUE-format TSV files (glue.py)
- `fit_linear_probe`                                   logistic regression on frozen features (probe.py)
"""

from course_lib.text.data import TextCollator, TextDataset, TextSplit, make_loader
from course_lib.text.glue import GLUE_FORMATS, TsvFormat, glue_format, load_glue_tsv
from course_lib.text.models import (
    encode_sentences,
    load_classifier,
    load_encoder,
    load_tokenizer,
    mean_pool,
    minilm_path,
    resolve_model,
    text_run_key,
)
from course_lib.text.probe import LinearProbe, fit_linear_probe
from course_lib.text.task import LABEL_NAMES, TextTask, label_of_clause, make_sentiment_task

__all__ = [
    "minilm_path",
    "resolve_model",
    "text_run_key",
    "load_tokenizer",
    "load_encoder",
    "load_classifier",
    "mean_pool",
    "encode_sentences",
    "TextSplit",
    "TextDataset",
    "TextCollator",
    "make_loader",
    "LABEL_NAMES",
    "TextTask",
    "label_of_clause",
    "make_sentiment_task",
    "TsvFormat",
    "GLUE_FORMATS",
    "glue_format",
    "load_glue_tsv",
    "LinearProbe",
    "fit_linear_probe",
]
