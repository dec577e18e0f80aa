"""Tests of course_lib.text: model loading, the generated task, batching, GLUE TSVs, the probe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from course_lib.text import (
    LABEL_NAMES,
    TextCollator,
    TextSplit,
    TsvFormat,
    encode_sentences,
    fit_linear_probe,
    glue_format,
    label_of_clause,
    load_encoder,
    load_glue_tsv,
    load_tokenizer,
    make_loader,
    make_sentiment_task,
    mean_pool,
    minilm_path,
    resolve_model,
)
from course_lib.text import task as task_module


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def encoder():
    return load_encoder().eval()


# ----------------------------------------------------------------------------- models


def test_packaged_minilm_is_there_and_loads(encoder):
    assert (minilm_path() / "config.json").is_file()
    config = encoder.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (6, 384, 1536)


def test_local_path_loads_the_same_weights(encoder):
    same = load_encoder(str(minilm_path()))
    for (name, a), (_, b) in zip(encoder.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("missing", ["./no/such/model", "/no/such/model", "a/b/c", Path("no_such_model_folder")])
def test_missing_model_path_is_a_clear_error(missing):
    with pytest.raises(FileNotFoundError, match="no model folder at .*None for the packaged"):
        load_encoder(missing)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        resolve_model("  ")


def test_hub_names_pass_through_without_network():
    # resolving does not download anything; it only decides how from_pretrained is called
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == ("sentence-transformers/all-MiniLM-L6-v2", {})
    source, kwargs = resolve_model(None)
    assert Path(source) == minilm_path() and kwargs == {"local_files_only": True}


def test_load_classifier_checks_num_labels():
    from course_lib.text import load_classifier

    with pytest.raises(ValueError, match="num_labels"):
        load_classifier(0)


def test_mean_pool_ignores_padding():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pool(hidden, torch.ones(2, 5))


def test_sentence_embeddings_do_not_depend_on_batch_padding(encoder, tokenizer):
    texts = ["A short one.", "A much longer sentence that forces padding onto the short one in its batch."]
    together = encode_sentences(encoder, tokenizer, texts, batch_size=2)
    alone = torch.cat([encode_sentences(encoder, tokenizer, [text]) for text in texts])
    assert together.shape == (2, 384)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- the generated task


_CLASS_OF_ADJECTIVE = {adj: key for key, adjectives in task_module._ADJECTIVES.items() for adj in adjectives}


def _clause_label(clause: str) -> int:
    """Independent reading of one clause: find adjective, negation and modifier words."""
    words = clause.lower().replace(",", " ").split()
    adjectives = [w for w in words if w in _CLASS_OF_ADJECTIVE]
    assert len(adjectives) == 1, clause
    polarity, strength = _CLASS_OF_ADJECTIVE[adjectives[0]]
    text = " " + " ".join(words) + " "
    if any(f" {n} " in text for n in ("not", "never", "hardly")):
        return label_of_clause(-polarity, "mild")  # negation flips and weakens
    if any(f" {m} " in text for m in task_module._INTENSIFIERS):
        return label_of_clause(polarity, "strong")
    if any(f" {m} " in text for m in task_module._DOWNTONERS):
        return label_of_clause(polarity, "mild")
    return label_of_clause(polarity, strength)


def _reference_label(text: str) -> int:
    """Which clause decides, read from the connective words."""
    sentence = text.rstrip(".")
    if ", but " in sentence:
        return _clause_label(sentence.split(", but ")[1])
    if ". However, " in sentence:
        return _clause_label(sentence.split(". However, ")[1])
    if sentence.startswith("Although "):
        return _clause_label(sentence.split(", ", 1)[1])
    for joint in (", although ", ", even though "):
        if joint in sentence:
            return _clause_label(sentence.split(joint)[0])
    return _clause_label(sentence)


def test_labels_follow_the_rules():
    task = make_sentiment_task(400, 100, 100, seed=3)
    for split in (task.train, task.validation, task.test):
        for text, label in zip(split.texts, split.labels):
            assert _reference_label(text) == label, text


def test_task_is_balanced_deterministic_and_has_all_constructions():
    task = make_sentiment_task(200, 40, 40, seed=1)
    assert task.label_names == LABEL_NAMES and task.num_labels == 4
    assert [task.train.labels.count(k) for k in range(4)] == [50] * 4
    again = make_sentiment_task(200, 40, 40, seed=1)
    assert again.train.texts == task.train.texts and again.test.labels == task.test.labels
    assert make_sentiment_task(200, 40, 40, seed=2).train.texts != task.train.texts
    assert {"plain", "negation", "contrast", "contrast+negation"} <= set(task.train.kinds)
    assert len(set(task.train.texts)) == len(task.train.texts)


def test_splits_are_about_disjoint_entities():
    task = make_sentiment_task(300, 100, 100, seed=0)

    def entities(split_name):
        return {e for entities, _ in task_module._DOMAINS.values() for e in entities[task_module._ENTITY_SPLITS[split_name]]}

    def mentioned(text, entity):
        return re.search(rf"\b{re.escape(entity)}\b", text.lower()) is not None

    for name, split in (("validation", task.validation), ("test", task.test)):
        assert not set(split.texts) & set(task.train.texts)
        for text in split.texts:
            assert not any(mentioned(text, e) for e in entities("train")), text
            assert any(mentioned(text, e) for e in entities(name)), text


def test_default_sizes_follow_the_fast_switch(monkeypatch):
    monkeypatch.setenv("COURSE_FAST", "1")
    task = make_sentiment_task()
    assert (len(task.train), len(task.validation), len(task.test)) == (256, 128, 128)
    with pytest.raises(ValueError, match="num_train"):
        make_sentiment_task(0)


def test_label_of_clause():
    assert [label_of_clause(p, s) for p, s in [(-1, "strong"), (-1, "mild"), (1, "mild"), (1, "strong")]] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        label_of_clause(0, "mild")


# ----------------------------------------------------------------------------- batching


def test_text_split_validates():
    with pytest.raises(ValueError, match="labels"):
        TextSplit(["a", "b"], [0], ("x", "y"))
    with pytest.raises(ValueError, match="0..1"):
        TextSplit(["a"], [2], ("x", "y"))
    split = TextSplit(["a", "b", "c"], [0, 1, 0], ("x", "y"), kinds=["k1", "k2", "k3"])
    assert split.subset([2, 0]).texts == ["c", "a"] and split.subset([2, 0]).kinds == ["k3", "k1"]


def test_loader_pads_per_batch_and_carries_labels(tokenizer):
    split = TextSplit(["short", "a longer sentence here", "x"], [1, 0, 1], ("neg", "pos"))
    batches = list(make_loader(split, tokenizer, batch_size=2))
    first = batches[0]
    expected = tokenizer(["short", "a longer sentence here"], padding=True, return_tensors="pt")
    assert torch.equal(first["input_ids"], expected["input_ids"])
    assert torch.equal(first["labels"], torch.tensor([1, 0]))
    assert batches[1]["input_ids"].shape == (1, 3)  # [CLS] x [SEP]: padded to its own batch only


def test_sentence_pairs_and_truncation(tokenizer):
    split = TextSplit(["one two", "three"], [0, 1], ("a", "b"), text_pairs=["four", "five six seven"])
    batch = TextCollator(tokenizer, max_length=5)([{"text": t, "text_pair": p, "label": y} for t, p, y in zip(split.texts, split.text_pairs, split.labels)])
    assert batch["input_ids"].shape[1] <= 5
    assert batch["token_type_ids"].max() == 1  # second segment present
    with pytest.raises(ValueError, match="max_length"):
        TextCollator(tokenizer, max_length=1)


def test_seeded_loader_shuffles_reproducibly(tokenizer):
    split = TextSplit([f"text {i}" for i in range(20)], [i % 2 for i in range(20)], ("a", "b"))
    order = lambda seed: [b["labels"].tolist() + b["input_ids"][:, 2].tolist() for b in make_loader(split, tokenizer, batch_size=5, shuffle=True, seed=seed)]  # noqa: E731
    assert order(7) == order(7)
    assert order(7) != order(8)


# ----------------------------------------------------------------------------- GLUE TSV files


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_sst2_format(tmp_path):
    path = _write(tmp_path / "train.tsv", ["sentence\tlabel", "a gorgeous film \t1", "dull and slow \t0"])
    split = load_glue_tsv(path, "SST-2")
    assert split.texts == ["a gorgeous film ", "dull and slow "]
    assert split.labels == [1, 0] and split.label_names == ("negative", "positive") and split.text_pairs is None


def test_cola_format_without_header(tmp_path):
    path = _write(tmp_path / "train.tsv", ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tThey drank the pub."])
    split = load_glue_tsv(path, "cola")
    assert split.texts == ["Our friends won't buy this analysis.", "They drank the pub."]
    assert split.labels == [1, 0]


def test_mrpc_format_with_bom_and_pairs(tmp_path):
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t702876\t702977\tHe said \"yes\".\tHe agreed.", "0\t2108705\t2108831\tA cat.\tA dog."]
    path = tmp_path / "dev.tsv"
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # Microsoft's files start with a BOM
    split = load_glue_tsv(path, "MRPC")
    assert split.texts == ['He said "yes".', "A cat."]  # quotes kept: no CSV quoting
    assert split.text_pairs == ["He agreed.", "A dog."] and split.labels == [1, 0]


def test_rte_text_labels(tmp_path):
    path = _write(tmp_path / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA man sleeps.\tA person rests.\tentailment", "1\tIt rains.\tIt is dry.\tnot_entailment"])
    split = load_glue_tsv(path, "RTE", limit=1)
    assert split.labels == [0] and split.text_pairs == ["A person rests."]
    assert load_glue_tsv(path, "RTE").labels == [0, 1]


def test_generic_format(tmp_path):
    path = _write(tmp_path / "any.tsv", ["x\tpos\tI like it", "y\tneg\tI do not"])
    spec = TsvFormat(text_column=2, label_column=1, label_names=("negative", "positive"), header=False, label_values=("neg", "pos"))
    split = load_glue_tsv(path, spec)
    assert split.labels == [1, 0] and split.texts == ["I like it", "I do not"]
    with pytest.raises(ValueError, match="integer column"):
        TsvFormat("text", "label", ("a", "b"), header=False)


def test_glue_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_glue"):
        load_glue_tsv(tmp_path / "missing.tsv", "SST-2")
    test_file = _write(tmp_path / "test.tsv", ["index\tsentence", "0\tno label here"])
    with pytest.raises(ValueError, match="no column 'label'.*test files"):
        load_glue_tsv(test_file, "SST-2")
    bad_label = _write(tmp_path / "bad.tsv", ["sentence\tlabel", "fine\t1", "odd\tmaybe"])
    with pytest.raises(ValueError, match="line 3: label 'maybe'"):
        load_glue_tsv(bad_label, "SST-2")
    short = _write(tmp_path / "short.tsv", ["gj04\t1"])
    with pytest.raises(ValueError, match="line 1: 2 tab-separated columns"):
        load_glue_tsv(short, "CoLA")
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_format("squad")


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    torch.manual_seed(0)
    n, l2 = 300, 0.05
    features = torch.randn(n, 5, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).long() + (features[:, 3] > 1).long()  # 3 classes
    probe = fit_linear_probe(features, labels, l2=l2)
    standardised = ((features - features.mean(0)) / features.std(0)).numpy()
    # sklearn minimises C * sum CE + ||W||^2 / 2, ours mean CE + l2 ||W||^2 / 2: C = 1 / (l2 n)
    reference = sklearn.LogisticRegression(C=1.0 / (l2 * n), tol=1e-10, max_iter=10_000).fit(standardised, labels.numpy())
    torch.testing.assert_close(probe.weight, torch.from_numpy(reference.coef_), atol=2e-3, rtol=1e-3)
    assert probe.accuracy(features, labels) == pytest.approx(reference.score(standardised, labels.numpy()))


def test_linear_probe_bad_input():
    with pytest.raises(ValueError, match="features"):
        fit_linear_probe(torch.randn(4, 3), [0, 1])
