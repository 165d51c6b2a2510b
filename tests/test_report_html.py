"""report.html: a self-contained, offline page that tells a board what a run did, rewritten each round."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.report_html import REFRESH_SECONDS, write_html

LABELS = ["Neoplasms", "<script>alert(1)</script>", "Injury"]


class _Page(HTMLParser):
    """Every tag with its attributes, the text, and whether the document nests properly."""

    VOID = {"meta", "br", "img", "rect", "line", "polyline", "input", "link"}

    def __init__(self):
        super().__init__()
        self.tags, self.text, self.stack, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _round(i, errors=()):
    return {"round": i, "run_id": "r", "eval_weighted": {"accuracy": 0.5 + 0.1 * i, "loss": 2.0 - 0.3 * i},
            "errors": list(errors), "stopped": False, "wall_seconds": 3.0 * i, "round_seconds": 3.0,
            "clients": [{"institution": k, "epsilon": 1.5 * i, "bytes_up": 1000, "bytes_down": 2000,
                         "eval": {"accuracy": 0.4 + 0.1 * i + 0.05 * k, "loss": 1.0, "num_examples": 40}}
                        for k in range(2)]}


@pytest.fixture
def run_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "minilm", "task": "classification"},
                                                        "federation": {"rounds": 3, "strategy": "fedadam"},
                                                        "privacy": {"target_epsilon": 8.0}}))
    rounds = [_round(0), _round(1), _round(2, errors=[{"phase": "train", "node": 7, "reason": "update rejected"}])]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    return folder


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _finish(folder):
    (folder / "summary.json").write_text(json.dumps({
        "rounds_planned": 3, "fixed_test": {"accuracy": 0.91, "records": 100},
        "per_institution": {"accuracy": {"0": 0.8, "1": 0.85}}, "local_only": {"accuracy": {"0": 0.6, "1": 0.7}},
        "worst_institution": {"institution": 0, "accuracy": 0.8},
        "per_class": {"labels": LABELS, "per_institution": {
            "0": {"confusion": [[3, 1, 0], [0, 0, 0], [1, 0, 1]], "per_class_accuracy": [0.75, None, 0.5],
                  "per_class_records": [4, 0, 2]},
            "1": {"confusion": [[2, 0, 0], [0, 1, 1], [0, 0, 4]], "per_class_accuracy": [1.0, 0.5, 1.0],
                  "per_class_records": [2, 2, 4]}}}}))


def test_a_running_page_reloads_itself_and_a_finished_one_shows_every_section(run_folder):
    page = _parse(write_html(run_folder))
    assert not page.errors and not page.stack
    refresh = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "refresh"]
    assert refresh and refresh[0]["content"] == str(REFRESH_SECONDS)
    assert "running" in "".join(page.text) and "round 2 of 3" in "".join(page.text)

    _finish(run_folder)
    page = _parse(write_html(run_folder))
    text = "".join(page.text)
    assert not page.errors and not page.stack
    assert not [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "refresh"]
    for section in ("Training by round", "Who gained what", "Per-class accuracy", "Privacy: ε spent",
                    "Operations: bytes, time, errors and rejected updates"):
        assert section in text, section
    assert "91.0%" in text and "node 7: update rejected" in text and "alone, same ε" in text
    # The heatmap: one cell per institution and class, grey where the institution holds no record of it.
    cells = [a for t, a in page.tags if t == "rect" and a.get("fill", "").startswith(("hsl(", "#eee"))]
    assert len(cells) == 2 * len(LABELS) and sum(a["fill"] == "#eee" for a in cells) == 1


def test_the_page_is_self_contained_and_escapes_what_it_shows(run_folder):
    """Offline: no script, stylesheet link, image or frame pointing anywhere; a label named like a script
    is shown as text, never run."""
    _finish(run_folder)
    path = write_html(run_folder)
    page = _parse(path)
    assert not [t for t, _ in page.tags if t in ("script", "link", "img", "iframe", "object", "embed")]
    for _, attrs in page.tags:
        for value in attrs.values():
            assert "http://" not in str(value) or "www.w3.org/2000/svg" in str(value)
            assert "https://" not in str(value)
    assert "<script>alert(1)</script>" in "".join(page.text)  # shown as text
    assert "<script>" not in path.read_text().replace("&lt;script&gt;", "")


def test_fedslm_report_rebuilds_the_page_and_refuses_a_folder_that_is_no_run(run_folder, tmp_path):
    (run_folder / "report.html").unlink(missing_ok=True)
    res = CliRunner().invoke(app, ["report", str(run_folder)])
    assert res.exit_code == 0, res.output
    assert (run_folder / "report.html").exists()
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "not a run folder" in res.output
