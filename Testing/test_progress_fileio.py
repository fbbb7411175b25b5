"""Tests for StealthMarkLib.progress (JSON lines, the tqdm bar, cancellation, the callback adapter) and
StealthMarkLib.fileio (atomic files and folders, never overwriting an input)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from StealthMarkLib.errors import Cancelled, InputError, StealthMarkError
from StealthMarkLib.fileio import (
    atomic_dir,
    atomic_path,
    refuse_overwriting_inputs,
    write_bytes_atomic,
    write_text_atomic,
)
from StealthMarkLib.progress import BarProgress, JsonProgress, Progress, make_progress


def _lines(buf: io.StringIO) -> list[dict]:
    text = buf.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, so that tqdm draws its bar."""

    def isatty(self) -> bool:
        return True


# -- JsonProgress ------------------------------------------------------------------------------------------
def test_json_progress_events(capsys):
    buf = io.StringIO()
    p = JsonProgress(buf, min_interval=0.0)
    p.start("lime", 3, "starting")
    p.advance(1)
    p.advance(2, "batch 2")
    p.log("decoded", payload_match=True, seconds=1.5)
    p.finish("done")
    recs = _lines(buf)
    assert recs == [
        {"event": "start", "stage": "lime", "total": 3, "message": "starting"},
        {"event": "progress", "stage": "lime", "done": 1, "total": 3, "message": ""},
        {"event": "progress", "stage": "lime", "done": 3, "total": 3, "message": "batch 2"},
        {"event": "log", "message": "decoded", "payload_match": True, "seconds": 1.5},
        {"event": "finish", "stage": "lime", "message": "done"},
    ]
    assert p.stage is None and p.done == 3
    assert capsys.readouterr().out == ""  # an explicit stream: stdout untouched


def test_json_progress_defaults_to_stdout(capsys):
    p = make_progress("json")
    assert isinstance(p, JsonProgress)
    p.start("embed", 2)
    p.log("hello", path=Path("/tmp/x"))  # non-JSON values are written as strings
    out = capsys.readouterr()
    recs = [json.loads(line) for line in out.out.splitlines()]
    assert [r["event"] for r in recs] == ["start", "log"]
    assert recs[1]["path"] == "/tmp/x"
    assert out.err == ""


def test_json_progress_throttles_but_emits_the_last_step():
    buf = io.StringIO()
    p = JsonProgress(buf, min_interval=3600.0)
    p.start("lime", 100)
    for _ in range(100):
        p.advance(1)
    p.finish()
    recs = _lines(buf)
    assert [r["event"] for r in recs] == ["start", "progress", "finish"]
    assert recs[1]["done"] == 100 and recs[1]["total"] == 100


def test_json_progress_each_line_is_one_object():
    buf = io.StringIO()
    p = JsonProgress(buf, min_interval=0.0)
    p.start("stage with \"quotes\"\nand a newline", 2)
    p.advance(1, "multi\nline")
    p.log("ok")
    recs = _lines(buf)
    assert len(recs) == 3
    assert recs[0]["stage"] == "stage with \"quotes\"\nand a newline"
    assert recs[1]["message"] == "multi\nline"


# -- BarProgress -------------------------------------------------------------------------------------------
def test_bar_progress_writes_to_its_stream_only(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    term = _Terminal()
    p = BarProgress(term)
    p.start("embed", 10)
    for _ in range(10):
        p.advance(1, "loss 0.1")
    p.log("halfway line")
    p.finish("finished line")
    text = term.getvalue()
    assert "embed" in text and "10/10" in text
    assert "halfway line" in text and "finished line" in text
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_bar_progress_default_is_stderr(capsys):
    p = make_progress(None)
    assert isinstance(p, BarProgress)
    p.start("lime", 2)
    p.advance(2)
    p.finish("all done")
    p.log("after")
    out = capsys.readouterr()
    assert out.out == ""
    assert "all done" in out.err and "after" in out.err


def test_bar_progress_quiet_when_not_a_terminal():
    buf = io.StringIO()
    p = BarProgress(buf)
    p.start("lime", 5)
    p.advance(5)
    p.finish()
    assert buf.getvalue() == ""  # no bar garbage in a log file; log lines still go through
    p.log("kept")
    assert buf.getvalue() == "kept\n"


def test_silent_progress(capsys):
    p = make_progress("none")
    assert type(p) is Progress
    p.start("x", 3)
    p.advance(3)
    p.log("nothing")
    p.finish()
    assert p.done == 3
    assert capsys.readouterr() == ("", "")


# -- cancellation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Progress, JsonProgress, BarProgress])
def test_cancel(cls):
    p = cls(io.StringIO()) if cls is not Progress else cls()
    p.start("lime", 10)
    p.advance(1)
    p.check()
    assert not p.cancelled
    p.cancel()
    assert p.cancelled
    with pytest.raises(Cancelled) as info:
        p.check()
    assert isinstance(info.value, StealthMarkError) and info.value.exit_code == 130
    with pytest.raises(Cancelled):
        p.advance(1)
    assert p.done == 1
    with pytest.raises(Cancelled):
        p.start("other", 5)
    p.finish()  # finishing after a cancel still tidies up


def test_cancel_from_another_thread():
    import threading

    p = Progress()
    t = threading.Thread(target=p.cancel)
    t.start()
    t.join()
    with pytest.raises(Cancelled):
        p.check()


# -- callback adapter --------------------------------------------------------------------------------------
def test_callback_absolute_counts():
    buf = io.StringIO()
    p = JsonProgress(buf, min_interval=0.0)
    cb = p.callback()
    for done in (8, 16, 20):
        cb(done, 20)
    recs = _lines(buf)
    assert recs[0] == {"event": "start", "stage": "work", "total": 20, "message": ""}
    assert [r["done"] for r in recs[1:]] == [8, 16, 20]
    # within a started stage the stage name is kept
    p.start("lime", 4)
    cb = p.callback()
    cb(2, 4)
    cb(4, 4)
    recs = _lines(buf)[4:]
    assert [r["event"] for r in recs] == ["start", "progress", "progress"]
    assert all(r["stage"] == "lime" for r in recs) and recs[-1]["done"] == 4


def test_callback_restarts_for_a_new_total_or_a_second_run():
    buf = io.StringIO()
    p = JsonProgress(buf, min_interval=0.0)
    cb = p.callback()
    cb(5, 10)
    cb(10, 10)
    cb(3, 30)             # a new total
    cb(4, 10)             # back to 10
    cb(10, 10)
    cb(2, 10)             # same total, counting starts over: a new run
    events = [(r["event"], r.get("done"), r.get("total")) for r in _lines(buf)]
    assert events == [
        ("start", None, 10), ("progress", 5, 10), ("progress", 10, 10),
        ("start", None, 30), ("progress", 3, 30),
        ("start", None, 10), ("progress", 4, 10), ("progress", 10, 10),
        ("start", None, 10), ("progress", 2, 10),
    ]


def test_callback_with_the_lime_engine():
    from StealthMarkLib.lime_engine import LimeExplainer

    def query(x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(x)
        return torch.cat([1 - p, p], dim=1)

    buf = io.StringIO()
    p = JsonProgress(buf, min_interval=0.0)
    explainer = LimeExplainer(query, grid=3, n_samples=20, batch_size=8)
    image = np.random.default_rng(0).random((1, 12, 12)).astype(np.float32)
    for _ in range(2):
        explainer.attribute(image, seed=1, progress=p)
    recs = _lines(buf)
    assert [(r["event"], r.get("done")) for r in recs] == [
        ("start", None), ("progress", 8), ("progress", 16), ("progress", 20)] * 2
    # a cancel raised through the callback stops the engine
    p.cancel()
    with pytest.raises(Cancelled):
        explainer.attribute(image, seed=1, progress=p)


# -- atomic files ------------------------------------------------------------------------------------------
def test_atomic_path_success(tmp_path):
    target = tmp_path / "out" / "volume.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name.startswith(".volume.nii.gz.") and tmp.name.endswith(".nii.gz")
        assert tmp != target and not target.exists()
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert os.listdir(target.parent) == ["volume.nii.gz"]


def test_atomic_path_suffixes(tmp_path):
    with atomic_path(tmp_path / "README") as tmp:
        assert tmp.suffix == ".tmp"
        tmp.write_text("x")
    with atomic_path(tmp_path / "model.pt", suffix=".bin") as tmp:
        assert tmp.name.endswith(".bin")
        tmp.write_text("y")
    assert sorted(os.listdir(tmp_path)) == ["README", "model.pt"]


@pytest.mark.parametrize("exc", [RuntimeError("writer failed"), KeyboardInterrupt(), Cancelled("stop")])
def test_atomic_path_failure_leaves_nothing(tmp_path, exc):
    target = tmp_path / "report.json"
    with pytest.raises(type(exc)):
        with atomic_path(target) as tmp:
            tmp.write_text('{"partial": ')
            raise exc
    assert os.listdir(tmp_path) == []


def test_atomic_path_failure_keeps_the_old_target(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]
    # and a successful write replaces it whole
    write_text_atomic(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01") == tmp_path / "b.bin"
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "report.json"]


def test_atomic_path_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_text_atomic("plain.txt", "hi")
    assert (tmp_path / "plain.txt").read_text() == "hi"
    assert os.listdir(tmp_path) == ["plain.txt"]


# -- inputs are never overwritten ---------------------------------------------------------------------------
def test_refuse_overwriting_inputs(tmp_path):
    src = tmp_path / "in.nii.gz"
    src.write_bytes(b"input")
    with pytest.raises(InputError, match="refusing to write the output over an input file"):
        refuse_overwriting_inputs(src, [src])
    with pytest.raises(InputError):
        refuse_overwriting_inputs(tmp_path / "sub" / ".." / "in.nii.gz", [None, str(src)])
    # the output is a symlink to the input, or the input a symlink to the output
    link = tmp_path / "link.nii.gz"
    link.symlink_to(src)
    with pytest.raises(InputError):
        refuse_overwriting_inputs(link, [src])
    with pytest.raises(InputError):
        refuse_overwriting_inputs(src, [link])
    # a hard link is the same file under another name
    hard = tmp_path / "hard.nii.gz"
    os.link(src, hard)
    with pytest.raises(InputError):
        refuse_overwriting_inputs(hard, [src])
    # different files, missing outputs and None inputs are fine
    other = tmp_path / "other.nii.gz"
    other.write_bytes(b"input")  # same content, different file
    refuse_overwriting_inputs(other, [src])
    refuse_overwriting_inputs(tmp_path / "new.nii.gz", [src, None, tmp_path / "missing.nii.gz"])
    refuse_overwriting_inputs(tmp_path / "new.nii.gz", [])
    assert src.read_bytes() == b"input"


# -- atomic folders ----------------------------------------------------------------------------------------
def test_atomic_dir_success(tmp_path):
    target = tmp_path / "evidence"
    target.mkdir()
    (target / "keep.txt").write_text("kept")
    (target / "report.json").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "report.json").write_text("new")
        (tmp / "qr").mkdir()
        (tmp / "qr" / "grid.png").write_bytes(b"png")
        assert (target / "report.json").read_text() == "old"  # nothing visible until the end
    assert (target / "report.json").read_text() == "new"
    assert (target / "keep.txt").read_text() == "kept"
    assert (target / "qr" / "grid.png").read_bytes() == b"png"
    assert sorted(os.listdir(tmp_path)) == ["evidence"]  # the temporary folder is gone


def test_atomic_dir_creates_target(tmp_path):
    target = tmp_path / "a" / "b"
    with atomic_dir(target) as tmp:
        (tmp / "x.txt").write_text("x")
    assert (target / "x.txt").read_text() == "x"
    assert os.listdir(tmp_path / "a") == ["b"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    target = tmp_path / "evidence"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "report.json").write_text("partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    target.mkdir()
    (target / "report.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "report.json").write_text("partial")
            raise KeyboardInterrupt
    assert (target / "report.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["evidence"]
