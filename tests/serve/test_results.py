"""Result files of predict: escaping, a torn last line after a kill, refusing foreign files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from pneumoscope.serve.results import ResultWriter, check_output, partial_path, safe_text

FIELDS = ("path", "prob_pneumonia", "error")


@pytest.mark.parametrize(("raw", "written"), [
    ("plain/α.png", "plain/α.png"),                       # valid UTF-8 stays as it is
    (os.fsdecode(b"bad\xff\xfe.png"), "bad\\xff\\xfe.png"),  # the name's bytes, escaped
    ("new\nline\t.png", "new\\nline\\t.png"),              # one row = one line
    ("lone\ud800.png", "lone\\ud800.png"),                 # not from a file name: still safe
])
def test_safe_text(raw: str, written: str) -> None:
    assert safe_text(raw) == written
    safe_text(raw).encode("utf-8")  # never raises


def test_a_torn_last_line_is_cut_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    with ResultWriter(out, FIELDS) as w:
        w.write([{"path": "a.png", "prob_pneumonia": 0.25}, {"path": "b.png", "prob_pneumonia": 0.5}])
    with out.open("a") as fh:
        fh.write("c.png,0.7")  # a kill in the middle of a write
    with ResultWriter(out, FIELDS, resume=True) as w:
        assert w.done == {"a.png", "b.png"} and w.first == {"path": "a.png", "prob_pneumonia": "0.25",
                                                            "error": ""}
        w.write([{"path": "c.png", "prob_pneumonia": 0.75}])
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["path"], r["prob_pneumonia"]) for r in rows] == [("a.png", "0.25"), ("b.png", "0.5"),
                                                                ("c.png", "0.75")]
    # A header cut short: the file starts again with a whole header.
    out.write_text("path,prob_")
    with ResultWriter(out, FIELDS, resume=True) as w:
        assert w.done == set()
    assert out.read_text() == "path,prob_pneumonia,error\n"


def test_resume_refuses_a_file_that_is_not_a_result(tmp_path: Path) -> None:
    out = tmp_path / "other.csv"
    out.write_text("name,score\nx,1\n")
    with pytest.raises(ValueError, match="not a result file of predict"):
        ResultWriter(out, FIELDS, resume=True)
    lines = tmp_path / "other.jsonl"
    lines.write_text('{"path": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        ResultWriter(lines, FIELDS, resume=True)


def test_json_array_is_written_at_the_end_and_resumes_from_a_complete_file(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    writer = ResultWriter(out, FIELDS)
    writer.write([{"path": "a.png", "prob_pneumonia": float("nan")}])
    assert not out.exists() and partial_path(out).exists()
    writer.close()
    assert json.loads(out.read_text()) == [{"path": "a.png", "prob_pneumonia": None, "error": None}]
    assert not partial_path(out).exists()
    with ResultWriter(out, FIELDS, resume=True) as w:
        assert w.done == {"a.png"}
        w.write([{"path": "b.png", "prob_pneumonia": 0.5}])
    assert [r["path"] for r in json.loads(out.read_text())] == ["a.png", "b.png"]
    # An interrupted run left a partial file: refused without --resume, said so.
    out.unlink()
    partial_path(out).write_text('{"path": "c.png"}\n')
    with pytest.raises(ValueError, match="interrupted run left"):
        check_output(out, resume=False)
    assert check_output(out, resume=True) == out
