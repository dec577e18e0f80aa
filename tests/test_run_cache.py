"""course_lib.run_cache: finished runs are reused, interrupted ones leave nothing, a changed key
(config, data, code) trains again, and nothing half-written is ever trusted."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from course_lib import run_cache
from course_lib.run_cache import RunCache, code_version, file_version, run_key_digest

KEY = {"setting": "lora", "seed": 0, "recipe": {"lr": 3e-3, "epochs": 4}}


class Counter:
    def __init__(self, value=None):
        self.calls, self.value = 0, value if value is not None else {"acc": 0.5}

    def __call__(self):
        self.calls += 1
        return self.value


def test_a_finished_run_is_reused_without_training_again(tmp_path):
    train = Counter()
    assert RunCache("exp", root=tmp_path).run(KEY, train) == {"acc": 0.5}
    again = RunCache("exp", root=tmp_path)  # a new kernel: only the disk remembers
    assert again.run(KEY, train) == {"acc": 0.5}
    assert train.calls == 1 and (again.hits, again.misses) == (1, 0)


def test_a_changed_config_is_not_reused(tmp_path):
    cache, train = RunCache("exp", root=tmp_path), Counter()
    cache.run(KEY, train)
    cache.run({**KEY, "recipe": {"lr": 1e-3, "epochs": 4}}, train)
    cache.run({**KEY, "seed": 1}, train)
    assert train.calls == 3
    assert run_key_digest(KEY) == run_key_digest(dict(reversed(list(KEY.items()))))  # order does not matter


def test_an_interrupted_run_leaves_no_entry(tmp_path):
    cache = RunCache("exp", root=tmp_path)

    def interrupted():
        raise KeyboardInterrupt  # Ctrl-C or a cell timeout in the middle of training

    with pytest.raises(KeyboardInterrupt):
        cache.run(KEY, interrupted)
    assert not cache.folder.exists() or list(cache.folder.iterdir()) == []
    train = Counter()
    cache.run(KEY, train)
    assert train.calls == 1


def test_a_truncated_or_foreign_entry_is_computed_again(tmp_path):
    cache, train = RunCache("exp", root=tmp_path), Counter()
    cache.run(KEY, train)
    path = cache.path(KEY)
    path.write_text(path.read_text()[:20])  # half a file, as a non-atomic writer could leave
    assert cache.run(KEY, train) == {"acc": 0.5} and train.calls == 2
    path.write_text('{"format_version": 1, "key": {"other": 1}, "value": {"acc": 0.9}}')  # not this key
    assert cache.run(KEY, train) == {"acc": 0.5} and train.calls == 3
    assert not list(cache.folder.glob("*.tmp"))


def test_fresh_runs_switch_trains_again_and_overwrites(tmp_path, monkeypatch):
    RunCache("exp", root=tmp_path).run(KEY, Counter({"acc": 0.1}))
    monkeypatch.setenv("COURSE_FRESH_RUNS", "1")
    train = Counter({"acc": 0.2})
    assert RunCache("exp", root=tmp_path).run(KEY, train) == {"acc": 0.2} and train.calls == 1
    monkeypatch.delenv("COURSE_FRESH_RUNS")
    assert RunCache("exp", root=tmp_path).get(KEY) == {"acc": 0.2}
    assert RunCache("exp", root=tmp_path, enabled=False).get(KEY) is None


def test_fast_and_full_runs_are_kept_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_FAST", "1")
    fast = RunCache("exp", root=tmp_path)
    monkeypatch.setenv("COURSE_FAST", "0")
    assert fast.folder != RunCache("exp", root=tmp_path).folder


def test_file_version_follows_the_bytes(tmp_path):
    data = tmp_path / "shapes.npz"
    data.write_bytes(b"version one")
    first = file_version(data)
    data.write_bytes(b"version two!")
    assert file_version(data) != first
    with pytest.raises(FileNotFoundError, match="make data"):
        file_version(tmp_path / "missing.npz")


def test_code_version_follows_the_source(tmp_path, monkeypatch):
    module_file = tmp_path / "course_cache_probe.py"
    module_file.write_text("LR = 1e-3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("course_cache_probe")
    before = code_version(module)
    module_file.write_text('"""Reworded."""\n# a comment\nLR = 1e-3   # the rate\n')
    assert code_version(module) == before   # docstrings, comments and layout keep the runs
    module_file.write_text("LR = 3e-3\n")
    assert code_version(module) != before
    sys.modules.pop("course_cache_probe", None)
    import course_lib.train

    assert code_version(course_lib.train) == code_version(course_lib.train)


def test_bad_use_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="one plain folder name"):
        RunCache("../elsewhere", root=tmp_path)
    with pytest.raises(TypeError, match="plain JSON"):
        RunCache("exp", root=tmp_path).run({"model": object()}, Counter())
    with pytest.raises(TypeError, match="plain JSON"):
        run_key_digest({"lr": float("nan")})
    with pytest.raises(TypeError, match="must be a dict"):
        run_key_digest(["lora", 0])
    with pytest.raises(TypeError, match="must be JSON"):
        RunCache("exp", root=tmp_path).run(KEY, lambda: {"weights": object()})
    with pytest.raises(ValueError, match="name the modules"):
        code_version()
    with pytest.raises(TypeError, match="imported modules"):
        code_version("course_lib.train")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_says_what_to_do(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(OSError, match="COURSE_CACHE_DIR"):
            RunCache("exp", root=read_only).run(KEY, Counter())
    finally:
        read_only.chmod(0o700)


def test_run_settings_reuses_stored_runs(tmp_path, monkeypatch):
    """The notebook-16 grid through the cache: the second call trains nothing."""
    from course_lib.point_peft import experiments

    calls = []

    def fake_run_setting(run):
        calls.append((run.setting, run.seed))
        return {"setting": run.setting, "label": run.name, "seed": run.seed, "acc": 0.25 + run.seed}

    monkeypatch.setattr(experiments, "run_setting", fake_run_setting)
    monkeypatch.setattr(experiments, "file_version", lambda path: "data-v1")  # no data set needed
    recipe = experiments.PointRecipe(num_epochs=1)
    runs = [experiments.SettingRun("lora", seed, recipe) for seed in (0, 1)]
    cache = RunCache("grid", root=tmp_path)
    first = experiments.run_settings(runs, cache=cache, progress=False)
    second = experiments.run_settings(runs, cache=RunCache("grid", root=tmp_path), progress=False)
    assert first == second and calls == [("lora", 0), ("lora", 1)]
    longer = [experiments.SettingRun("lora", 0, experiments.PointRecipe(num_epochs=2))]
    experiments.run_settings(longer, cache=cache, progress=False)
    assert calls[-1] == ("lora", 0) and len(calls) == 3  # a changed recipe trains again
    keys = {run_cache.run_key_digest(experiments.setting_run_key(run)) for run in runs + longer}
    assert len(keys) == 3


def test_a_cache_folder_that_cannot_be_made_says_what_to_do(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(OSError, match="COURSE_CACHE_DIR"):
        RunCache("exp", root=blocker).run(KEY, Counter())


def test_code_fingerprint_keeps_what_computes():
    from course_lib.run_cache import code_fingerprint

    plain = "def f(x):\n    return x * 2\n"
    documented = 'def f(x):\n    """Twice x."""\n    # the rule\n    return (x *\n            2)\n'
    assert code_fingerprint(plain) == code_fingerprint(documented)
    assert code_fingerprint(plain) != code_fingerprint(plain.replace("2", "3"))
    assert code_fingerprint('def f():\n    """Only a docstring."""\n') == code_fingerprint("def f():\n    pass\n")
    assert code_fingerprint('x = "not a docstring"\n') != code_fingerprint('x = "another string"\n')
    fragment = "sorted(rows, key=lambda r: r[0]),\n    reverse=True)\n"   # inspect.getsource of a lambda in a call
    assert code_fingerprint(fragment) == fragment   # does not parse: taken as it is


def test_content_and_function_versions():
    from course_lib.run_cache import content_version, function_version

    assert content_version(["a good film"], [2]) == content_version(["a good film"], [2])
    assert content_version(["a good film"], [2]) != content_version(["a good film"], [3])
    assert content_version(["a", "b"]) != content_version(["a"], ["b"])  # the split between values counts

    def recipe_a(lr):
        return lr * 2

    def recipe_b(lr):
        return lr * 3

    assert function_version(recipe_a) != function_version(recipe_b)
    with pytest.raises(TypeError, match="plain JSON"):
        content_version({1, 2})
    with pytest.raises(ValueError, match="pass the values"):
        content_version()
    with pytest.raises(TypeError, match="source can be read"):
        function_version(len)


def test_text_run_key_follows_the_task():
    from course_lib.text import make_sentiment_task, text_run_key

    small, other = make_sentiment_task(8, 4, 4, seed=0), make_sentiment_task(8, 4, 4, seed=1)
    assert text_run_key(small) == text_run_key(make_sentiment_task(8, 4, 4, seed=0))
    assert text_run_key(small)["data"] != text_run_key(other)["data"]
    assert text_run_key(small)["model"] == text_run_key(other)["model"]


class TrainedModel:
    """compute() for run_with_model: 'trains' a small model (a seeded change of its weights and
    BatchNorm statistics), counting calls."""

    def __init__(self):
        self.calls = 0

    @staticmethod
    def untrained():
        import torch

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
        model[0].weight.requires_grad_(False)  # frozen, as a pre-trained weight under PEFT
        return model

    def __call__(self):
        import torch

        self.calls += 1
        model = self.untrained()
        with torch.no_grad():
            model[2].weight.add_(1.0)
            model[0].bias.mul_(3.0)
        model.train()(torch.randn(8, 4))  # moves the running statistics
        return {"acc": 0.75}, model


def test_a_run_with_its_model_is_reused_with_the_trained_weights(tmp_path):
    import torch

    train = TrainedModel()
    row, trained = RunCache("exp", root=tmp_path).run_with_model(KEY, train, TrainedModel.untrained)
    again = RunCache("exp", root=tmp_path)
    row_again, reloaded = again.run_with_model(KEY, train, TrainedModel.untrained)
    assert train.calls == 1 and (again.hits, again.misses) == (1, 0) and row_again == row == {"acc": 0.75}
    for (name, a), (_, b) in zip(trained.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name  # trainable weights, frozen weights and BatchNorm statistics alike
    assert not reloaded.training and not trained.training
    stored = run_cache.trained_state(trained)
    assert "0.weight" not in stored and {"0.bias", "2.weight", "1.running_mean"} <= set(stored)  # the frozen weight is rebuilt, not stored


def test_a_run_with_a_missing_or_foreign_state_trains_again(tmp_path):
    cache, train = RunCache("exp", root=tmp_path), TrainedModel()
    cache.run_with_model(KEY, train, TrainedModel.untrained)
    cache.state_path(KEY).unlink()  # a row without its state: not trusted
    cache.run_with_model(KEY, train, TrainedModel.untrained)
    assert train.calls == 2
    cache.state_path(KEY).write_bytes(cache.state_path(KEY).read_bytes()[:-7])  # a torn state file
    cache.run_with_model(KEY, train, TrainedModel.untrained)
    assert train.calls == 3
    assert cache.clear() == 1 and list(cache.folder.iterdir()) == []


def test_an_interrupted_run_with_model_leaves_no_entry_and_a_wrong_rebuild_is_refused(tmp_path):
    import torch

    cache = RunCache("exp", root=tmp_path)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.run_with_model(KEY, interrupted, TrainedModel.untrained)
    assert not cache.folder.exists() or list(cache.folder.iterdir()) == []
    cache.run_with_model(KEY, TrainedModel(), TrainedModel.untrained)
    with pytest.raises(ValueError, match="does not fit the model rebuild"):
        cache.run_with_model(KEY, TrainedModel(), lambda: torch.nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"must return \(row, model\)"):
        cache.run_with_model({**KEY, "seed": 5}, lambda: ({"acc": 1.0}, "not a model"), TrainedModel.untrained)
