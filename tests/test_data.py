"""Readers, tasks and the bundled dataset; every bad input names file, line and column."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.config.schema import DataConfig
from fedslm.data import load_task_data
from fedslm.data.tasks import IGNORE_INDEX, get_task
from fedslm.errors import ConfigError, DataError
from fedslm.models import load_base


def _cfg(path, **kw):
    return DataConfig(source=str(path), **kw)


def test_csv_classification(class_csv):
    data = load_task_data(_cfg(class_csv), "classification")
    assert data.labels == ["cardio", "ortho", "resp"]
    assert len(data.train) + len(data.test) == 120
    assert len(data.test) == 12
    again = load_task_data(_cfg(class_csv), "classification")
    assert again.dataset_id == data.dataset_id and again.test == data.test  # seeded split


def test_jsonl_causal_pairs(causal_jsonl):
    data = load_task_data(_cfg(causal_jsonl), "causal_lm")
    assert data.labels is None and data.train[0].prompt.endswith("code")


def test_causal_loss_only_on_completion_tokens(tiny_llama_dir, causal_jsonl):
    from fedslm.config.schema import ModelConfig

    base = load_base(ModelConfig(name=str(tiny_llama_dir), task="causal_lm"))
    data = load_task_data(_cfg(causal_jsonl), "causal_lm")
    enc = get_task("causal_lm").encode(data.train[:5], base.tokenizer, 64)
    for example, ids, targets in zip(data.train, enc.input_ids, enc.targets):
        n_prompt = len(base.tokenizer(example.prompt)["input_ids"])
        assert targets[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert targets[n_prompt:] == ids[n_prompt:]
        assert targets[-1] == base.tokenizer.eos_token_id


def test_plain_text_jsonl_trains_on_every_token(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "fever and cough"}\n{"text": "left arm fracture"}\n{"text": "chest pain"}\n')
    data = load_task_data(_cfg(path), "causal_lm")
    assert all(e.prompt == "" for e in data.train)


def test_fixed_labels_from_config_are_index_order(class_csv):
    data = load_task_data(_cfg(class_csv, labels=["resp", "ortho", "cardio", "other"]), "classification")
    assert data.labels == ["resp", "ortho", "cardio", "other"]


def test_bundled_icd10():
    data = load_task_data(DataConfig(source="icd10"), "classification")
    assert len(data.train) + len(data.test) == 48_671
    assert len(data.labels) == 22
    assert len(data.test) == 4_867
    assert data.labels[0].startswith("Certain infectious and parasitic diseases")
    assert {e.label for e in data.train} == set(range(22))
    again = load_task_data(DataConfig(source="icd10"), "classification")
    assert again.test == data.test and again.dataset_id == data.dataset_id


def test_bundled_task_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="data.source 'icd10' is a classification dataset but model.task is 'causal_lm'"):
        load_task_data(DataConfig(source="icd10"), "causal_lm")


@pytest.mark.parametrize(
    "name, content, task, kw, message",
    [
        ("empty.csv", b"", "classification", {}, r"empty.csv: file is empty"),
        ("header.csv", b"text,label\n", "classification", {}, r"header.csv: no records after the header"),
        ("nolabel.csv", b"text,diagnosis\nfever,resp\n", "classification", {},
         r"nolabel.csv line 1: missing column 'label' \(columns found: text, diagnosis\)"),
        ("unknown.csv", b"text,label\nfever,resp\ncough,resp\nbone,ortho\narm,dental\n", "classification",
         {"labels": ["resp", "ortho"]}, r"unknown.csv line 5, column 'label': unknown label 'dental'"),
        ("latin1.csv", "text,label\nfever,resp\ncaf\u00e9 pain,cardio\n".encode("latin-1"), "classification", {},
         r"latin1.csv line 3: byte 0xe9 at character 4 is not UTF-8"),
        ("emptytext.csv", b"text,label\nfever,resp\n  ,cardio\n", "classification", {},
         r"emptytext.csv line 3, column 'text': empty value"),
        ("bad.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": \n', "classification", {},
         r"bad.jsonl line 2: malformed JSON"),
        ("missing.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b"}\n', "classification", {},
         r"missing.jsonl line 2: missing column 'label'"),
        ("array.jsonl", b'["a", "b"]\n', "classification", {}, r"array.jsonl line 1: expected a JSON object"),
        ("pairs.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', "causal_lm", {},
         r"pairs.jsonl line 2: missing column 'completion'"),
        ("records.txt", b"hello\n", "classification", {}, r"records.txt: unsupported file type '.txt'"),
    ],
)
def test_bad_data_names_file_line_and_column(tmp_path, name, content, task, kw, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_task_data(_cfg(path, **kw), task)


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.source '.*nope.csv': file does not exist"):
        load_task_data(_cfg(tmp_path / "nope.csv"), "classification")


def test_cli_bad_data_is_one_line(tmp_path, tiny_bert_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fever", "label": "resp"}) + "\n{oops\n")
    res = CliRunner().invoke(app, ["train", f"model.name={tiny_bert_dir}", f"data.source={path}",
                                   f"output.dir={tmp_path / 'out'}"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert f"error: {path} line 2: malformed JSON" in res.output


def test_a_generated_answer_is_scored_by_its_code_and_the_chapter_range_that_holds_it():
    from fedslm.data.bundled import _icd10_rows
    from fedslm.data.codes import Chapters, read_code, score

    rows = _icd10_rows()
    chapters = Chapters.from_names(load_task_data(DataConfig(source="icd10"), "classification").labels)
    # The reference is the table itself: every code reads as itself and its range names its own chapter.
    assert all(read_code(f" {r['icd10_code']} ({r['chapter_desc']})") == r["icd10_code"] for r in rows)
    assert all(chapters.of(r["icd10_code"]) == r["chapter_desc"] for r in rows)
    for answer in ["10.1.1.1.1.", "J", "J2", "j20.6", "The code is J20.6", "J20.6.1", "JJ0", ""]:
        assert read_code(answer) is None, answer
    assert read_code("J20.6, acute bronchitis") == "J20.6"
    truths = ["J20.6", "J20.6", "J20.6", "C7A.00", "QA0.0"]
    answers = [" J20.6 (Diseases of the respiratory system (J00-J99))", " J45.909", " A09", " C50.1", " 10.1.1"]
    s = score(answers, truths, chapters)
    assert (s.records, s.well_formed, s.exact, s.chapter) == (5, 4, 1, 3)
    assert s.as_dict()["exact_code"] == 0.2


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_ids_from_the_rust_backend_are_the_tokenizers_own(tiny_bert_dir, side):
    """Classification's encode asks a fast tokenizer's backend directly (3x faster); the ids must be the
    tokenizer's own call's, truncation side included, and a tokenizer whose own call differs from its
    backend's keeps its own result."""
    import copy
    import random

    from transformers import AutoTokenizer

    from fedslm.data import tasks

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir, truncation_side=side)
    words = ["heart", "chest", "pain", "lung", "cough", "fever", "zebra", "bone"]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 20))) for _ in range(300)]

    def own(t, batch):
        return [list(x) for x in t(batch, truncation=True, max_length=8, add_special_tokens=True)["input_ids"]]

    assert sum(len(tok(t)["input_ids"]) > 8 for t in texts) > 100  # truncation is exercised
    sizes: list[int] = []
    real_call = type(tok).__call__

    def counted(self, batch, **kw):
        sizes.append(len(batch))
        return real_call(self, batch, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(tok), "__call__", counted)
        fast = tasks.truncated_ids(tok, texts, 8)
    assert sizes == [tasks._CHECKED]  # the backend did the rest, after the check agreed
    assert fast == own(tok, texts)
    assert tasks.get_task("classification").encode(
        [tasks.ClassificationExample(t, 0) for t in texts], tok, 8).input_ids == own(tok, texts)

    class Adding(type(tok)):  # a Python side that adds to the backend's ids
        def __call__(self, *a, **k):
            out = super().__call__(*a, **k)
            out["input_ids"] = [list(x) + [1] for x in out["input_ids"]]
            return out

    adding = copy.deepcopy(tok)
    adding.__class__ = Adding
    assert tasks.truncated_ids(adding, texts, 8) == own(adding, texts) != own(tok, texts)
