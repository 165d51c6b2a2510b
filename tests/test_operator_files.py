"""A careless operator's files (issue 29, item 7): each bad data file, duplicated YAML key or non-finite
ε/δ is refused by the command line in one line naming the file, the line and the problem, exit 2, no
traceback; ``fedslm simulate`` refuses bad data before Flower starts."""

from __future__ import annotations

import codecs
import json

import pytest
import yaml
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.config.schema import DataConfig
from fedslm.data import load_task_data
from fedslm.data.validate import MAX_FIELD_CHARS
from fedslm.errors import DataError

HEADER = "text,label\n"
GOOD = ["chest pain heart,cardio\n", "lung cough,resp\n"]  # lines 2 and 3; line 4 is the bad one
TAIL = [f"{w} {i},{label}\n" for i in range(20) for w, label in (("fever cough", "resp"), ("arm fracture", "ortho"),
                                                                  ("heart pain", "cardio"))]


def _csv(bad_line: str) -> bytes:
    return (HEADER + "".join(GOOD) + bad_line + "".join(TAIL)).encode("utf-8")


def _jsonl(bad_line: str) -> bytes:
    good = [json.dumps({"text": f"cough {i}", "label": "resp"}) + "\n" for i in range(3)]
    rest = [json.dumps({"text": f"{w} {i}", "label": lab}) + "\n"
            for i in range(20) for w, lab in (("heart", "cardio"), ("bone", "ortho"))]
    return ("".join(good) + bad_line + "".join(rest)).encode("utf-8")


GOOD_CSV = _csv("bone arm,ortho\n")
# (file name, content, what the one line must say after "<path>"; a regex)
BAD_FILES = [
    ("empty_label.csv", _csv("leg fracture,\n"), r" line 4, column 'label': empty value"),
    ("blank_label.csv", _csv("leg fracture,   \n"), r" line 4, column 'label': empty value"),
    ("missing_field.csv", _csv("leg fracture\n"), r" line 4: 1 field, but the header \(line 1\) has 2"),
    ("extra_field.csv", _csv("leg, fracture,ortho\n"), r" line 4: 3 fields, but the header \(line 1\) has 2"),
    ("duplicate_header.csv", ("text,label,label\n" + "".join(f"cough {i},resp,ortho\n" for i in range(40))).encode(),
     r" line 1: the header names column 'label' twice \(fields 2 and 3\)"),
    ("unterminated_quote.csv", _csv('"leg fracture,ortho\n'), r" line 4: a quote opened in this record is never closed"),
    ("stray_quote.csv", _csv('"leg" fracture,ortho\n'), r" line 4: a stray or unterminated quote"),
    ("utf16_bom.csv", GOOD_CSV.decode().encode("utf-16"), r" line 1: the file is UTF-16 \(little-endian\) text"),
    ("utf16_be_bom.csv", codecs.BOM_UTF16_BE + GOOD_CSV.decode().encode("utf-16-be"),
     r" line 1: the file is UTF-16 \(big-endian\) text"),
    ("utf16_no_bom.csv", GOOD_CSV.decode().encode("utf-16-le"), r" line 1: the file looks like UTF-16 \(little-endian"),
    ("latin1.csv", _csv("caf\u00e9 leg,ortho\n").decode().encode("latin-1"),
     r" line 4: byte 0xe9 at character 4 is not UTF-8 \(it looks like Latin-1 / Windows-1252\)"),
    ("nul_byte.csv", _csv("leg\x00 fracture,ortho\n"), r" line 4: a NUL byte at character 4"),
    ("workbook.csv", b"PK\x03\x04" + b"\x00" * 64, r" line 1: the file is a ZIP archive"),
    ("huge_field.csv", _csv("x" * (MAX_FIELD_CHARS + 1) + ",ortho\n"), r" line 4: a field .*over the cap of 131,072"),
    ("header_only.csv", HEADER.encode(), r": no records after the header \(line 1\)"),
    ("semicolons.csv", GOOD_CSV.replace(b",", b";"), r" line 1: the header is one column 'text;label': the file looks "
                                                      r"semicolon-separated"),
    ("empty.csv", b"", r": file is empty"),
    ("blank.csv", b"\n\n  \n", r": file is empty"),
    ("not_object.jsonl", _jsonl("[1, 2]\n"), r" line 4: expected a JSON object, got list"),
    ("array.jsonl", (json.dumps([{"text": "leg", "label": "ortho"}] * 40) + "\n").encode(),
     r" line 1: expected a JSON object, got list; JSONL holds one object per line"),
    ("pretty.json.jsonl", json.dumps([{"text": "leg", "label": "ortho"}] * 40, indent=2).encode(),
     r" line 1: malformed JSON .*is this a pretty-printed .json file\?"),
    ("missing_column.jsonl", _jsonl('{"text": "leg"}\n'), r" line 4: missing column 'label'"),
    ("duplicate_key.jsonl", _jsonl('{"text": "leg", "label": "ortho", "label": "resp"}\n'),
     r" line 4: key 'label' appears twice"),
    ("nan.jsonl", _jsonl('{"text": NaN, "label": "ortho"}\n'), r" line 4: NaN is not valid JSON"),
    ("malformed.jsonl", _jsonl('{"text": "leg", "label": \n'), r" line 4: malformed JSON"),
    ("huge_value.jsonl", _jsonl(json.dumps({"text": "x" * (MAX_FIELD_CHARS + 1), "label": "ortho"}) + "\n"),
     r" line 4, column 'text': a field of 131,073 characters over the cap"),
]


def _one_line_error(res, path, problem: str) -> None:
    import re

    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert re.search(re.escape(f"error: {path}") + problem, lines[0]), lines[0]


def test_the_good_file_passes_node_check(tmp_path, node_policy):
    """The control: the rows the bad files are built from pass, so each refusal below is the bad line's."""
    for name, content in (("good.csv", GOOD_CSV), ("good.jsonl", _jsonl(json.dumps({"text": "leg", "label": "ortho"})
                                                                          + "\n"))):
        path = tmp_path / name
        path.write_bytes(content)
        res = CliRunner().invoke(app, ["node", "check", str(node_policy(data=path, name=path.stem)), "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["data"]["train_records"] >= 40


@pytest.mark.parametrize("name, content, problem", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_node_check_refuses_a_bad_data_file_in_one_line(tmp_path, node_policy, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    res = CliRunner().invoke(app, ["node", "check", str(node_policy(data=path))])
    _one_line_error(res, path, problem)


@pytest.mark.parametrize("name, content, problem", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_every_reader_refuses_the_same_files(tmp_path, name, content, problem):
    """A node serving a round, fedslm train and simulate read through load_task_data: the same refusal."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=problem):
        load_task_data(DataConfig(source=str(path)), "classification")


def test_names_from_a_file_are_printed_as_text_not_console_markup(tmp_path, node_policy):
    """A column named like rich markup ('[/b]') made the error printer itself raise a traceback."""
    path = tmp_path / "records.csv"
    path.write_bytes(("text,[/b],[/b]\n" + "".join(f"cough {i},resp,x\n" for i in range(30))).encode())
    res = CliRunner().invoke(app, ["node", "check", str(node_policy(data=path))])
    _one_line_error(res, path, r" line 1: the header names column '\[/b\]' twice")


def test_node_check_without_a_label_set_still_reads_a_classification_file_as_one(tmp_path, node_policy):
    """Falling back to causal LM (the file is valid plain text) hid an empty label; the label column decides."""
    path = tmp_path / "records.csv"
    path.write_bytes(_csv("leg fracture,\n"))
    res = CliRunner().invoke(app, ["node", "check", str(node_policy(data=path, labels=None))])
    _one_line_error(res, path, r" line 4, column 'label': empty value")


def test_valid_csv_and_jsonl_oddities_are_accepted_with_true_line_numbers(tmp_path):
    """Strictness refuses broken files, not valid ones: quoted commas, quoted line breaks, doubled quotes,
    a UTF-8 byte-order mark, CRLF line ends, blank lines, and U+2028 inside a JSON string."""
    path = tmp_path / "ok.csv"
    body = HEADER + '"pain, chest",cardio\r\n"two\nlines ""quoted""",resp\r\n\r\n' + "".join(TAIL) + "leg,\n"
    path.write_bytes(codecs.BOM_UTF8 + body.encode())
    with pytest.raises(DataError, match=r"ok.csv line 66, column 'label': empty value"):  # counted across the break
        load_task_data(DataConfig(source=str(path)), "classification")
    path.write_bytes(codecs.BOM_UTF8 + body.removesuffix("leg,\n").encode())
    data = load_task_data(DataConfig(source=str(path), test_fraction=0.5), "classification")
    texts = {e.text for e in data.train + data.test}
    assert {"pain, chest", 'two\nlines "quoted"'} <= texts and len(texts) == 62
    jl = tmp_path / "ok.jsonl"
    jl.write_bytes(_jsonl(json.dumps({"text": "leg\u2028arm", "label": "ortho"}, ensure_ascii=False) + "\n"))
    assert any(e.text == "leg\u2028arm" for e in (lambda d: d.train + d.test)(
        load_task_data(DataConfig(source=str(jl)), "classification")))


@pytest.mark.parametrize("name, content, problem", [
    ("header_only.csv", HEADER.encode(), r": no records after the header \(line 1\)"),
    ("extra_field.csv", _csv("leg, fracture,ortho\n"), r" line 4: 3 fields"),
    ("utf16_bom.csv", GOOD_CSV.decode().encode("utf-16"), r" line 1: the file is UTF-16"),
])
def test_simulate_refuses_bad_data_before_flower_starts(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["simulate", f"data.source={path}", f"output.dir={out}",
                                   "federation.num_clients=2", "federation.min_clients=2"])
    _one_line_error(res, path, problem)
    assert not out.exists()  # no run folder: no flower.log, no SuperLink, nothing started


def test_simulate_refuses_too_many_institutions_before_flower_starts(tmp_path):
    path = tmp_path / "records.csv"
    path.write_bytes(GOOD_CSV)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["simulate", f"data.source={path}", f"output.dir={out}", "federation.num_clients=9",
                                   "federation.partitioner=iid"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "federation.num_clients=9 is too many" in res.output and not out.exists()


def _policy_text(tmp_path, path_data, extra: str = "") -> str:
    return (f"name: h\ndata:\n  source: {path_data}\n  labels: [cardio, ortho, resp]\n  min_test_records: 1\n"
            f"privacy:\n  ledger: {tmp_path / 'l.json'}\n  max_epsilon: 8.0\n  max_delta: 1.0e-4\n{extra}")


def test_a_policy_key_given_twice_is_refused_naming_the_key_and_lines(tmp_path):
    data = tmp_path / "records.csv"
    data.write_bytes(GOOD_CSV)
    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy_text(tmp_path, data, "  max_epsilon: 80.0\n"))  # the second one would win
    res = CliRunner().invoke(app, ["node", "check", str(policy)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"node policy {policy}: duplicate key 'privacy.max_epsilon' on line 10 (first on line 8)" in res.output
    policy.write_text(_policy_text(tmp_path, data, "privacy:\n  max_epsilon: 80.0\n"))  # a whole section twice
    res = CliRunner().invoke(app, ["node", "check", str(policy)])
    assert res.exit_code == 2 and "duplicate key 'privacy' on line 10 (first on line 6)" in res.output
    policy.write_text(_policy_text(tmp_path, data))
    assert CliRunner().invoke(app, ["node", "check", str(policy)]).exit_code == 0


def test_a_run_config_key_given_twice_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("privacy:\n  target_epsilon: 1.0\n  delta: 1.0e-6\n  target_epsilon: 50.0\n")
    res = CliRunner().invoke(app, ["config", "show", "-c", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "duplicate key 'privacy.target_epsilon' on line 4 (first on line 2)" in res.output
    path.write_text("privacy:\n  target_epsilon: 1.0\n  delta: 1.0e-6\n")
    assert CliRunner().invoke(app, ["config", "show", "-c", str(path)]).exit_code == 0


@pytest.mark.parametrize("section, key", [
    ("evaluation", "max_epsilon"), ("evaluation", "epsilon_per_evaluation"), ("evaluation", "loss_cap"),
    ("privacy", "max_delta"), ("privacy", "max_epsilon"), ("privacy", "max_epsilon_alone"),
    ("secure_aggregation", "max_unverified_share"), ("resources", "max_memory_gb"), ("data", "test_fraction"),
])
@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_a_non_finite_policy_value_is_refused_naming_the_key(tmp_path, node_policy, section, key, value):
    data = tmp_path / "records.csv"
    data.write_bytes(GOOD_CSV)
    path = node_policy(data=data)
    content = yaml.safe_load(path.read_text())
    content.setdefault(section, {})[key] = float(value.replace(".", ""))
    path.write_text(yaml.safe_dump(content))
    res = CliRunner().invoke(app, ["node", "check", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"{section}.{key} must be a finite number" in res.output


def test_an_infinite_epsilon_cap_stays_allowed_only_for_a_node_that_allows_non_private_rounds(tmp_path, node_policy):
    """A non-private round costs ε = ∞, so such a node may cap at ∞; no other node may."""
    from fedslm.node.policy import PolicyError, load_policy

    data = tmp_path / "records.csv"
    data.write_bytes(GOOD_CSV)
    assert load_policy(node_policy(data=data, max_epsilon=float("inf"), allow_non_private=True)).privacy.max_epsilon \
        == float("inf")
    with pytest.raises(PolicyError, match="privacy.max_epsilon must be a finite number"):
        load_policy(node_policy(data=data, max_epsilon=float("inf")))


@pytest.mark.parametrize("key", ["privacy.target_epsilon", "privacy.delta", "privacy.noise_multiplier",
                                 "privacy.max_grad_norm", "privacy.max_epsilon", "privacy.client_level.noise_multiplier",
                                 "privacy.client_level.clipping_norm", "privacy.client_level.delta"])
@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_a_non_finite_run_config_value_is_refused_naming_the_key(tmp_path, key, value):
    section, *rest = key.split(".")
    nested = {rest[-1]: value}
    for part in reversed(rest[:-1]):
        nested = {part: nested}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({section: nested}).replace(f"'{value}'", value))
    for args in (["-c", str(path)], [f"{key}={value}"]):
        res = CliRunner().invoke(app, ["config", "show", *args])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert f"{key} must be a finite number" in res.output, res.output


@pytest.mark.parametrize("key", ["privacy.ledger", "data.source"])
def test_a_relative_ledger_or_data_path_in_the_policy_is_refused(tmp_path, node_policy, monkeypatch, key):
    """From another folder a relative ledger would be a fresh, empty one (a budget reset without a word)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "records.csv").write_bytes(GOOD_CSV)
    path = node_policy(data=tmp_path / "records.csv")
    content = yaml.safe_load(path.read_text())
    section, name = key.split(".")
    content[section][name] = "ledger.json" if name == "ledger" else "records.csv"
    path.write_text(yaml.safe_dump(content))
    res = CliRunner().invoke(app, ["node", "check", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"{key} must be an absolute path" in res.output


def test_node_init_writes_absolute_quoted_paths_that_node_check_reads(tmp_path, monkeypatch):
    """Relative --data/--ledger are written absolute; a '#' or ': ' in a path is quoted, not cut short."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rec #1: a.csv").write_bytes(GOOD_CSV)
    res = CliRunner().invoke(app, ["node", "init", "p.yaml", "--data", "rec #1: a.csv", "--ledger", "l.json"])
    assert res.exit_code == 0, res.output
    content = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert content["data"]["source"] == str(tmp_path / "rec #1: a.csv")
    assert content["privacy"]["ledger"] == str(tmp_path / "l.json")
    res = CliRunner().invoke(app, ["node", "check", "p.yaml", "--json"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args, message", [
    (["--epsilon", "inf"], "--epsilon must be > 0 and finite, got inf"),
    (["--epsilon", "nan"], "--epsilon must be > 0 and finite, got nan"),
    (["--epsilon", "3", "--delta", "nan"], "--delta must be in (0, 1), got nan"),
    (["--epsilon", "3", "--delta", "-1"], "--delta must be in (0, 1), got -1.0"),
])
def test_privacy_plan_refuses_a_non_finite_epsilon_or_delta(args, message):
    res = CliRunner().invoke(app, ["privacy", "plan", "-n", "1000", "-b", "10", "-s", "5", "-r", "2", *args])
    assert res.exit_code == 2 and "Traceback" not in res.output and message in res.output, res.output
