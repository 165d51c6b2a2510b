"""The node's ledger: composed across rounds and restarts, never reset, cap enforced locally."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.errors import BudgetExceededError
from fedslm.lora import get_adapter_state
from fedslm.privacy import Ledger, LedgerError, epsilon
from fedslm.train import build_node, ledger_path, train_round


def test_ledger_composes_every_round(tmp_path):
    led = Ledger(tmp_path / "l.json")
    for r in range(3):
        led.charge("d1", (1.2, 0.05, 40), delta=1e-5, num_examples=1000, run="a", round=r + 1)
    assert led.spent("d1", 1e-5) == pytest.approx(epsilon([(1.2, 0.05, 120)], 1e-5))
    assert led.spent("other", 1e-5) == 0.0  # one accountant per dataset
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp files


def test_ledger_survives_a_process_restart(tmp_path):
    path = tmp_path / "l.json"
    code = (
        "import sys; from fedslm.privacy import Ledger; "
        f"Ledger(r'{path}').charge('d', (1.0, 0.1, 50), delta=1e-5, num_examples=100, run='x', round=1)"
    )
    for _ in range(2):  # two separate processes, as two rounds of a deployed ClientApp
        subprocess.run([sys.executable, "-c", code], check=True)
    led = Ledger(path)
    assert len(led.entries("d")) == 2
    assert led.spent("d", 1e-5) == pytest.approx(epsilon([(1.0, 0.1, 100)], 1e-5))


def test_unreadable_ledger_refuses_rather_than_resets(tmp_path):
    path = tmp_path / "l.json"
    path.write_text("{ not json")
    with pytest.raises(LedgerError, match="refusing to train"):
        Ledger(path).spent("d", 1e-5)
    path.write_text(json.dumps({"some": "thing"}))
    with pytest.raises(LedgerError):
        Ledger(path).charge("d", (1.0, 0.1, 1), delta=1e-5, num_examples=10)


def test_check_refuses_past_cap_and_names_it(tmp_path):
    led = Ledger(tmp_path / "l.json")
    led.charge("d", (0.8, 0.1, 100), delta=1e-5, num_examples=100)
    spent = led.spent("d", 1e-5)
    with pytest.raises(BudgetExceededError, match=r"privacy.max_epsilon=.*refusing"):
        led.check("d", (0.8, 0.1, 100), delta=1e-5, max_epsilon=spent + 0.01)
    before, after = led.check("d", (0.8, 0.1, 1), delta=1e-5, max_epsilon=spent + 10)
    assert before == pytest.approx(spent) and after > before


def test_training_rounds_charge_the_ledger_before_release_and_stop_at_cap(cls_config):
    cfg = cls_config("federation.rounds=2", "privacy.target_epsilon=2")
    node = build_node(cfg)
    led = Ledger(ledger_path(cfg))
    spent = []
    for r in (1, 2):
        res = train_round(node.model, node.train, cfg, dataset_id=node.data.dataset_id, ledger=led,
                          run_id="run-a", round_idx=r)
        assert len(led.entries(node.data.dataset_id)) == r  # on disk when the result is returned
        assert res.epsilon == pytest.approx(led.spent(node.data.dataset_id, res.delta))
        spent.append(res.epsilon)
    assert spent[0] < spent[1] <= 2.0 + 1e-9
    # A third round (e.g. a coordinator asking for more) would pass the node's cap: refused, nothing charged.
    state = get_adapter_state(node.model)
    with pytest.raises(BudgetExceededError):
        train_round(node.model, node.train, cfg, dataset_id=node.data.dataset_id, ledger=led, run_id="run-a",
                    round_idx=3)
    assert len(led.entries(node.data.dataset_id)) == 2
    after = get_adapter_state(node.model)
    assert all((state[k] == after[k]).all() for k in state)  # no training happened

    # A fresh process (new node object, same ledger file) continues from the spent budget.
    node2 = build_node(cfg)
    with pytest.raises(BudgetExceededError, match=r"spent so far ε=1\.9"):
        train_round(node2.model, node2.train, cfg, dataset_id=node2.data.dataset_id, ledger=Ledger(ledger_path(cfg)),
                    run_id="run-b", round_idx=1)


def test_node_cap_wins_over_a_larger_target(cls_config):
    cfg = cls_config("privacy.target_epsilon=8", "privacy.max_epsilon=1")
    node = build_node(cfg)
    with pytest.raises(BudgetExceededError, match="max_epsilon=1"):
        train_round(node.model, node.train, cfg, dataset_id=node.data.dataset_id, ledger=Ledger(ledger_path(cfg)))


def test_non_private_training_is_recorded_as_infinite_and_refused_under_a_cap(cls_config):
    capped = cls_config("privacy.enabled=false", "privacy.max_epsilon=5")
    node = build_node(capped)
    with pytest.raises(BudgetExceededError, match="no privacy guarantee"):
        train_round(node.model, node.train, capped, dataset_id=node.data.dataset_id, ledger=Ledger(ledger_path(capped)))
    cfg = cls_config("privacy.enabled=false")
    led = Ledger(ledger_path(cfg))
    res = train_round(node.model, node.train, cfg, dataset_id=node.data.dataset_id, ledger=led)
    assert math.isinf(res.epsilon)
    # After a non-private release, no DP round on that dataset can claim a finite ε.
    with pytest.raises(BudgetExceededError, match="∞"):
        train_round(node.model, node.train, cls_config(), dataset_id=node.data.dataset_id, ledger=led)


def test_ledger_show_cli(tmp_path):
    path = tmp_path / "ledger.json"
    led = Ledger(path)
    led.charge("hospital-a:abc", (1.0, 0.02, 100), delta=1e-5, num_examples=5000, run="r", round=1)
    led.charge("hospital-a:abc", (1.0, 0.02, 100), delta=1e-5, num_examples=5000, run="r", round=2)
    runner = CliRunner()
    res = runner.invoke(app, ["ledger", "show", str(path), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows[0]["dataset_id"] == "hospital-a:abc" and rows[0]["rounds"] == 2 and rows[0]["steps"] == 200
    assert rows[0]["epsilon"] == pytest.approx(epsilon([(1.0, 0.02, 200)], 1e-5))
    table = runner.invoke(app, ["ledger", "show", str(path)])
    assert table.exit_code == 0 and "hospital-a:abc" in table.stdout
    missing = runner.invoke(app, ["ledger", "show", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
