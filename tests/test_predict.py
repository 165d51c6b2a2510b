"""`fedslm predict`: every record labelled as the adapter model labels it alone, in the input's order."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.lora import save_adapter
from fedslm.lora.adapter import adapter_meta
from fedslm.lora.merge import load_tuned
from fedslm.privacy import Ledger
from fedslm.train import build_node, ledger_path, round_spec, train_round


@pytest.fixture
def cls_adapter(cls_config, tmp_path):
    """A mean-pooled, normalised classifier after one DP round, saved as a run folder's adapter/."""
    cfg = cls_config("model.pooling=mean", "model.normalize=true", "train.lr=0.5")
    node = build_node(cfg)
    train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=Ledger(ledger_path(cfg)))
    return save_adapter(node.model, tmp_path / "adapter", adapter_meta(cfg, node.base.fingerprint,
                                                                        list(node.data.labels)))


@torch.no_grad()
def _one_by_one(adapter, texts):
    """The obviously correct reference: each text alone through the adapter model, softmax, sorted."""
    tuned = load_tuned(adapter)
    out = []
    for text in texts:
        enc = tuned.base.tokenizer(text, truncation=True, max_length=16, return_tensors="pt")
        probs = torch.softmax(tuned.model(**enc).logits[0], -1)
        order = probs.argsort(descending=True)
        out.append([(tuned.meta["labels"][int(k)], float(probs[k])) for k in order])
    return out


def test_predict_labels_every_record_as_the_model_alone_does_and_reports_bad_rows(cls_adapter, tmp_path):
    texts = ["alpha beta gamma", "a much longer record with many words in it to pad the others", "delta",
             "", "epsilon zeta eta theta"]
    source = tmp_path / "new.csv"
    with open(source, "w", newline="") as fh:
        table = csv.writer(fh)
        table.writerow(["id", "text"])
        table.writerows([[i, t] for i, t in enumerate(texts)])
    out = tmp_path / "labels.jsonl"
    res = CliRunner().invoke(app, ["predict", "--adapter", str(cls_adapter), "--input", str(source), "--out", str(out),
                                   "--top-k", "2", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert f"{source} line 5: column 'text' is empty" in res.output and "labelled 4 of 5 records" in res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [2, 3, 4, 6]  # input order, the empty record (line 5) skipped
    reference = _one_by_one(cls_adapter, [t for t in texts if t])
    for row, ref in zip(rows, reference):
        assert row["label"] == ref[0][0] and row["probability"] == pytest.approx(ref[0][1], abs=1e-5)
        assert [label for label, _ in row["top"]] == [label for label, _ in ref[:2]]
    as_csv = tmp_path / "labels.csv"
    res = CliRunner().invoke(app, ["predict", "-a", str(cls_adapter), "-i", str(source), "-o", str(as_csv)])
    assert res.exit_code == 0, res.output
    with open(as_csv, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["label"] for r in table] == [r["label"] for r in rows]


def test_predict_names_the_file_and_line_of_a_malformed_record_and_a_missing_column(cls_adapter, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    res = CliRunner().invoke(app, ["predict", "-a", str(cls_adapter), "-i", str(bad)])
    assert res.exit_code == 2 and f"{bad} line 2: malformed JSON" in res.output
    other = tmp_path / "other.csv"
    other.write_text("note\nhello\n")
    res = CliRunner().invoke(app, ["predict", "-a", str(cls_adapter), "-i", str(other)])
    assert res.exit_code == 2 and "missing column 'text'" in res.output
    res = CliRunner().invoke(app, ["predict", "-a", str(cls_adapter), "-i", str(other), "--column", "note"])
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[0])["line"] == 2


def test_a_mean_pooled_classifier_exports_to_a_folder_plain_sentence_transformers_loads(cls_adapter, tmp_path):
    """`fedslm export` of a mean-pooled, normalised classifier: a fresh Python that never imports fedslm loads
    it with sentence-transformers alone, and encode() gives fedslm's logits (labels.json names them)."""
    import subprocess
    import sys

    out = tmp_path / "exported"
    res = CliRunner().invoke(app, ["export", "--adapter", str(cls_adapter), "--out", str(out)])
    assert res.exit_code == 0, res.output
    texts = ["alpha beta gamma", "a much longer record with many words in it", "delta"]
    script = (
        "import json, sys\n"
        "from sentence_transformers import SentenceTransformer\n"
        f"m = SentenceTransformer({str(out)!r}, device='cpu', local_files_only=True)\n"
        f"logits = m.encode({texts!r}, convert_to_numpy=True).tolist()\n"
        "assert not any(k.startswith('fedslm') for k in sys.modules), 'fedslm was imported'\n"
        f"print(json.dumps({{'logits': logits, 'labels': json.load(open({str(out / 'labels.json')!r}))}}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    tuned = load_tuned(cls_adapter)
    with torch.no_grad():
        enc = tuned.base.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        ours = tuned.model(**enc).logits
    assert torch.allclose(torch.tensor(loaded["logits"]), ours, atol=1e-4)
    assert loaded["labels"] == tuned.meta["labels"]
    again = CliRunner().invoke(app, ["export", "--adapter", str(cls_adapter), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output
