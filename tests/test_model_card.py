"""The model card (adapter/README.md): every figure it states is the one in summary.json, ε and δ never
rounded down, a figure the run did not measure says so, and train and export write it."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.lora.card import build_card, read_card_metadata, worst_class, write_card, write_export_card
from fedslm.lora.card_privacy import up

LABELS = ["Diseases of the circulatory system (I00-I99)", "Injury | poisoning <b>", "Neoplasms (C00-D49)"]


def _run_folder(tmp_path, summary: dict, cfg: dict, meta: dict) -> object:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "adapter" / "fedslm.json").write_text(json.dumps(meta))
    (run / "adapter" / "README.md").write_text("PEFT's placeholder card\n")
    return run


def _federated_summary() -> dict:
    conf0 = [[40, 0, 2], [3, 7, 0], [0, 0, 10]]
    conf1 = [[20, 0, 0], [5, 5, 0], [1, 0, 30]]
    return {
        "run_id": "run-42", "rounds_completed": 100, "rounds_planned": 100, "strategy": "fedadam",
        "institutions": 2, "base_fingerprint": "ab" * 32,
        "final": {"loss": 0.41, "accuracy": 0.8876, "macro_f1": 0.8123},
        "per_institution": {"accuracy": {"0": 0.9017, "1": 0.8605}},
        "worst_institution": {"institution": 1, "accuracy": 0.8605},
        "privacy": {"unit": "one record of one institution (example-level DP, per institution)",
                    "per_institution": {"0": {"epsilon": 7.995464407862816, "delta": 2.5e-06},
                                        "1": {"epsilon": 7.98, "delta": 0.000925925925925926}},
                    "noise_source": "torch generator seeded from the OS CSPRNG (not cryptographically secure)"},
        "fixed_test": {"accuracy": 0.9082, "macro_f1": 0.8431, "records": 4867},
        "per_class": {"labels": LABELS, "per_institution": {
            "0": {"confusion": conf0, "per_class_accuracy": [40 / 42, 0.7, 1.0], "per_class_records": [42, 10, 10]},
            "1": {"confusion": conf1, "per_class_accuracy": [1.0, 0.5, 30 / 31], "per_class_records": [20, 10, 31]},
        }},
        "local_only": {"accuracy": {"0": 0.8511, "1": 0.7345}},
    }


CFG = {"model": {"name": "minilm", "task": "classification"}, "data": {"source": "icd10"},
       "privacy": {"accountant": "prv", "enabled": True, "unit": "all-records"},
       "lora": {"r": 8, "alpha": 16.0, "layers": 0, "ffa": False}}
META = {"model": "minilm", "task": "classification", "labels": LABELS, "text_column": "text"}


def test_up_rounds_a_privacy_figure_up_never_down():
    assert up(7.995464407862816) == "7.996"
    assert up(8.0) == "8"
    assert up(7.98) == "7.98"
    assert up(0.000925925925925926, 3) == "0.000926"
    assert up(2.5e-06, 3) == "2.5e-06"
    assert float(up(1.00001)) >= 1.00001


def test_federated_card_states_every_figure_of_summary_json(tmp_path):
    summary = _federated_summary()
    run = _run_folder(tmp_path, summary, CFG, META)
    path = write_card(run, simulated=True)
    assert path == run / "adapter" / "README.md"
    card = path.read_text()
    assert "PEFT's placeholder" not in card
    meta = read_card_metadata(path)
    # Hugging Face metadata: base, library, licence of the base, task, tags.
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-classification"
    assert set(meta["tags"]) >= {"federated-learning", "differential-privacy", "lora", "fedslm"}
    # The exact figures travel in the metadata, equal to summary.json's.
    assert meta["fedslm"]["privacy"]["per_institution"] == summary["privacy"]["per_institution"]
    assert meta["fedslm"]["evaluation"]["fixed_test"] == summary["fixed_test"]
    assert meta["fedslm"]["institutions"] == 2 and meta["fedslm"]["rounds_completed"] == 100
    # Privacy: ε and δ per institution, rounded up; the unit; the accountant of the scenario.
    assert "| 0 | 7.996 | 2.5e-06 |" in card
    assert "| 1 | 7.98 | 0.000926 |" in card
    assert summary["privacy"]["unit"] in card
    assert "accountant: `prv`" in card
    assert "client-level DP: off" in card and "secure aggregation (SecAgg+): off" in card
    # Institutions and rounds.
    assert "institutions: 2" in card and "rounds: 100 completed of 100 planned" in card
    # Evaluation: fixed test split, weighted held-out, worst institution, worst class.
    assert "(4867 records never trained on): accuracy **90.82%**, macro-F1 0.843" in card
    assert "accuracy 88.76%, macro-F1 0.812" in card
    assert "worst institution: 1, accuracy 86.05%" in card
    # Pooled over institutions: class 0 60/62, class 1 12/20 = 60%, class 2 40/41.
    assert worst_class(summary["per_class"]) == (LABELS[1], 0.6, 20)
    assert "worst class: `Injury \\| poisoning &lt;b&gt;`, accuracy 60.00% on 20 held-out records" in card
    # Skew: per-class accuracy per institution, and federated against alone.
    assert "| Injury \\| poisoning &lt;b&gt; | 70.00% (10) | 50.00% (10) |" in card
    assert "| 0 | 90.17% | 85.11% |" in card and "| 1 | 86.05% | 73.45% |" in card
    assert "## Intended use and limits" in card
    assert "data: the bundled dataset `icd10`" in card


def test_a_data_file_is_never_named_in_the_card(tmp_path):
    cfg = {**CFG, "data": {"source": "/srv/hospital-a/patients_2026"}}
    card = build_card(_run_folder(tmp_path, _federated_summary(), cfg, META), simulated=True)
    assert "patients_2026" not in card and "institutions' own records (not named here" in card


def test_a_figure_the_run_did_not_measure_is_said_to_be_not_measured(tmp_path):
    summary = _federated_summary()
    for key in ("fixed_test", "per_class", "local_only"):
        del summary[key]
    summary["final"] = {"loss": 0.5, "accuracy": 0.8, "macro_f1": -1}  # a deployed node withholds macro-F1
    summary["privacy"]["per_institution"]["1"]["epsilon"] = None  # and, with its size private, its ε
    run = _run_folder(tmp_path, summary, CFG, META)
    card = build_card(run)  # a deployment: the nodes' policies chose the accountant
    assert "fixed test split: not measured" in card
    assert "accuracy 80.00%, macro-F1 not measured" in card
    assert "worst class: not measured" in card
    assert "| 1 | withheld by the institution |" in card
    assert "each institution composes with its own policy's accountant (the run asked for `prv`)" in card
    assert "Per-class scores: not measured in this run" in card
    assert "Held-out accuracy per institution: 0: 90.17%, 1: 86.05%." in card


def test_distributed_dp_states_the_sum_and_alone_and_client_level_dp(tmp_path):
    summary = _federated_summary()
    summary["privacy"]["per_institution"] = {"0": {"epsilon": 8.0, "delta": 1e-06, "epsilon_alone": 21.50321}}
    summary["privacy"]["client_level"] = {"epsilon": 3.2101, "delta": 1e-05, "rounds": 100,
                                          "unit": "one institution's entire data", "accountant": "rdp"}
    summary["privacy"]["secure_aggregation"] = {"threshold": 0.75}
    cfg = {**CFG, "privacy": {**CFG["privacy"], "distributed": {"honest": 5}}}
    card = build_card(_run_folder(tmp_path, summary, cfg, META), simulated=True)
    assert "| 0 | 8 | 1e-06 | 21.51 |" in card
    assert "**secure sum**" in card and "only if 5 contributors" in card
    assert "client-level DP at aggregation: ε = 3.211 at δ = 1e-05" in card
    assert "secure aggregation (SecAgg+): on" in card


def test_a_local_run_card_and_a_gemma_base_licence(tmp_path):
    summary = {"run_id": "r1", "model": "gemma3-270m", "base_fingerprint": "cd" * 32, "unit": "ward-7",
               "train_records": 900, "test_records": 100,
               "before": {"loss": 2.0, "perplexity": 7.1234}, "after": {"loss": 1.6, "perplexity": 4.953},
               "privacy": {"enabled": True, "epsilon": 2.999, "delta": 1e-05, "noise_multiplier": 1.2345678,
                           "sample_rate": 0.032, "noise_source": "OS CSPRNG"}}
    run = _run_folder(tmp_path, summary, {"privacy": {"accountant": "rdp"}, "model": {"task": "causal_lm"}},
                      {"model": "gemma3-270m", "task": "causal_lm", "labels": None})
    # Two rounds of this run, one of an earlier run into the same folder, and a line cut short by a crash.
    (run / "metrics.jsonl").write_text('{"run_id": "r0", "round": 1}\n{"run_id": "r1", "round": 1}\n'
                                       '{"run_id": "r1", "round": 2}\n{"run_id": "r1", "ro')
    card = build_card(run)
    meta = read_card_metadata_text(card)
    assert meta["license"] == "gemma" and meta["base_model"] == "google/gemma-3-270m"
    assert meta["pipeline_tag"] == "text-generation"
    assert "**ε = 2.999, δ = 1e-05**" in card and "privacy unit `ward-7`" in card
    assert "σ = 1.235" in card and "sample rate q = 0.032" in card
    assert "institutions: 1" in card and "rounds: 2; training records: 900, held-out records: 100" in card
    assert "held-out perplexity: 4.95" in card
    assert "before training, the base with the initial adapter: perplexity 7.12" in card


def test_an_export_of_a_moved_adapter_keeps_its_card_and_one_without_says_what_is_unknown(tmp_path):
    import shutil

    summary = _federated_summary()
    run = _run_folder(tmp_path, summary, CFG, META)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    write_card(run, simulated=True)
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(run / "adapter", moved)
    out = tmp_path / "export"
    out.mkdir()
    card = write_export_card(moved, out, "transformers").read_text()
    meta = read_card_metadata(out / "README.md")
    assert meta["library_name"] == "transformers"
    assert meta["fedslm"] == read_card_metadata(run / "adapter" / "README.md")["fedslm"]
    assert "| 0 | 7.996 | 2.5e-06 |" in card and "AutoModelForSequenceClassification" in card
    assert "load_tuned" not in card
    (moved / "README.md").unlink()
    card = write_export_card(moved, out, "sentence-transformers").read_text()
    assert "not stated here" in card and "ε" not in card
    assert read_card_metadata(out / "README.md")["library_name"] == "sentence-transformers"


def read_card_metadata_text(card: str) -> dict:
    return yaml.safe_load(card[4:card.index("\n---\n", 4)])


@pytest.fixture(scope="module")
def trained_run(tiny_bert_dir, tmp_path_factory):
    """A real `fedslm train` on the tiny BERT: its run folder."""
    tmp = tmp_path_factory.mktemp("card-train")
    from conftest import _class_rows

    data = tmp / "records.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in _class_rows(120)))
    out = tmp / "run"
    res = CliRunner().invoke(app, [
        "train", f"model.name={tiny_bert_dir}", "model.max_length=16", f"data.source={data}", "lora.r=2",
        "train.batch_size=16", "train.physical_batch_size=8", "train.local_steps=2", "federation.rounds=2",
        "privacy.target_epsilon=4", f"output.dir={out}"])
    assert res.exit_code == 0, res.output
    return out


def test_train_writes_a_card_with_the_epsilon_and_delta_of_its_summary(trained_run, tiny_bert_dir):
    summary = json.loads((trained_run / "summary.json").read_text())
    card = (trained_run / "adapter" / "README.md").read_text()
    eps, delta = summary["privacy"]["epsilon"], summary["privacy"]["delta"]
    assert f"**ε = {up(eps)}, δ = {up(delta)}**" in card
    meta = read_card_metadata(trained_run / "adapter" / "README.md")
    assert meta["fedslm"]["privacy"]["epsilon"] == eps and meta["fedslm"]["privacy"]["delta"] == delta
    assert meta["library_name"] == "peft"
    assert str(tiny_bert_dir) not in card  # a local base is named by its folder, not this machine's path
    assert f"accuracy {100 * summary['after']['accuracy']:.2f}%" in card


def test_export_writes_the_card_of_its_run_for_the_exported_library(trained_run, tmp_path):
    out = tmp_path / "exported"
    res = CliRunner().invoke(app, ["export", "--adapter", str(trained_run / "adapter"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((trained_run / "summary.json").read_text())
    meta = read_card_metadata(out / "README.md")
    assert meta["library_name"] == "transformers"
    assert meta["fedslm"]["privacy"]["epsilon"] == summary["privacy"]["epsilon"]
    assert f"ε = {up(summary['privacy']['epsilon'])}" in (out / "README.md").read_text()
