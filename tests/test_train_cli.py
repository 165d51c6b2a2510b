"""`fedslm train` end to end on a tiny model: the run folder, ε per round, refusal on re-run."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.config.schema import ModelConfig
from fedslm.models import load_base


def _args(tiny_bert_dir, class_csv, out, *extra):
    return ["train", f"model.name={tiny_bert_dir}", "model.max_length=16", f"data.source={class_csv}",
            "lora.r=2", "train.batch_size=16", "train.physical_batch_size=8", "train.local_steps=3",
            "federation.rounds=3", "privacy.target_epsilon=4", f"output.dir={out}", *extra]


def test_train_writes_the_run_folder_and_epsilon_grows(tiny_bert_dir, class_csv, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, _args(tiny_bert_dir, class_csv, out))
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "adapter",
                                               "privacy_ledger.json"}
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    eps = [r["epsilon"] for r in rounds]
    assert eps == sorted(eps) and eps[0] > 0 and eps[-1] <= 4.0 + 1e-9
    assert all("not cryptographically secure" in r["noise_source"] for r in rounds)
    assert {"accuracy", "macro_f1", "loss"} <= set(rounds[-1]["eval"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(eps[-1])
    base = load_base(ModelConfig(name=str(tiny_bert_dir)), num_labels=3)
    assert summary["base_fingerprint"] == base.fingerprint
    PeftModel.from_pretrained(base.model, out / "adapter")  # loads as a PEFT folder

    # Same node, same ledger, same data: the budget is spent, so a second run is refused.
    again = CliRunner().invoke(app, _args(tiny_bert_dir, class_csv, out))
    assert again.exit_code == 2
    assert "refusing to train" in again.output and "Traceback" not in again.output


@pytest.mark.parametrize(("argv", "code", "fast"), [(["simulate"], 0, True), (["simulate"], None, True),
                                                    (["simulate"], 2, False), (["train"], 0, False), ([], 0, False)])
def test_the_console_script_skips_the_teardown_only_after_a_successful_simulate(monkeypatch, argv, code, fast):
    """`fedslm simulate` ends by os._exit once it succeeded (the interpreter's teardown with torch loaded is
    seconds); a failed simulate and every other command exit as usual, with their own code."""
    import tomllib
    from pathlib import Path

    from fedslm.cli import main as cli_main

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fedslm"] == "fedslm.cli.main:main"  # the console script is the one with the fast exit

    exits: list[int] = []

    def app():
        raise SystemExit(code)

    monkeypatch.setattr(cli_main, "app", app)
    monkeypatch.setattr(cli_main.sys, "argv", ["fedslm", *argv])
    monkeypatch.setattr("os._exit", lambda c: exits.append(c) or (_ for _ in ()).throw(SystemExit("os._exit")))
    with pytest.raises(SystemExit) as raised:
        cli_main.main()
    assert (exits == [0] and raised.value.code == "os._exit") if fast else (exits == [] and raised.value.code == code)
