"""course_lib.results.update_json (a results file filled in part by several notebooks) and the timing helpers."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from course_lib.meters import interleaved_median_seconds, median_seconds
from course_lib.results import update_json, write_json


def _update(path: str, key: str) -> None:
    for i in range(20):
        update_json(path, {key: i})


def test_update_json_keeps_the_other_keys(tmp_path):
    path = tmp_path / "deft.json"
    update_json(path, {"protocols": {"paper": 1}})
    update_json(path, {"sparsified": {"relu": 2}})
    update_json(path, {"protocols": {"masked": 3}})  # a top-level key is replaced whole
    assert json.loads(path.read_text()) == {"protocols": {"masked": 3}, "sparsified": {"relu": 2}}
    assert not list(tmp_path.glob("*.tmp"))


def test_update_json_from_two_processes_loses_no_key(tmp_path):
    path = str(tmp_path / "shared.json")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_update, args=(path, key)) for key in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert json.loads(open(path).read()) == {"a": 19, "b": 19}


def test_update_json_refuses_a_file_that_is_not_an_object(tmp_path):
    path = write_json(tmp_path / "list.json", [1, 2])
    with pytest.raises(ValueError, match="not an object"):
        update_json(path, {"a": 1})
    with pytest.raises(TypeError, match="dict"):
        update_json(tmp_path / "x.json", [("a", 1)])


def test_timing_helpers_call_each_function_and_check_their_arguments():
    calls = {"a": 0, "b": 0}

    def bump(key):
        calls[key] += 1

    seconds = interleaved_median_seconds({"a": lambda: bump("a"), "b": lambda: bump("b")}, repeats=4, warmup=1)
    assert set(seconds) == {"a", "b"} and all(value >= 0 for value in seconds.values())
    assert calls == {"a": 5, "b": 5}
    assert median_seconds(lambda: None, repeats=3, warmup=0) >= 0
    with pytest.raises(ValueError, match="empty"):
        interleaved_median_seconds({})
    with pytest.raises(ValueError, match="repeats"):
        median_seconds(lambda: None, repeats=0)


def test_the_fast_switch_has_one_source_of_truth(monkeypatch):
    """config.FAST, is_fast() and fast_or_full read COURSE_FAST when they are read (issue 14)."""
    from course_lib import config

    monkeypatch.setenv("COURSE_FAST", "1")
    assert config.FAST is True and config.is_fast() and config.fast_or_full("fast", "full") == "fast"
    monkeypatch.setenv("COURSE_FAST", "0")
    assert config.FAST is False and not config.is_fast() and config.fast_or_full("fast", "full") == "full"
