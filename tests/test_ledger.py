"""The node's ledger: composed across rounds and restarts, never reset, cap enforced locally."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.errors import BudgetExceededError
from fedslm.lora import get_adapter_state
from fedslm.privacy import Ledger, LedgerError, epsilon
from fedslm.train import round_spec, build_node, ledger_path, train_round


def test_ledger_composes_every_round(tmp_path):
    led = Ledger(tmp_path / "l.json")
    for r in range(3):
        led.charge("d1", (1.2, 0.05, 40), delta=1e-5, num_examples=1000, run="a", round=r + 1)
    assert led.spent("d1", 1e-5) == pytest.approx(epsilon([(1.2, 0.05, 120)], 1e-5))
    assert led.spent("other", 1e-5) == 0.0  # one accountant per privacy unit
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
    with pytest.raises(BudgetExceededError, match=r"max_epsilon=.*refusing"):
        led.check("d", (0.8, 0.1, 100), delta=1e-5, max_epsilon=spent + 0.01)
    before, after = led.check("d", (0.8, 0.1, 1), delta=1e-5, max_epsilon=spent + 10)
    assert before == pytest.approx(spent) and after > before


def test_training_rounds_charge_the_ledger_before_release_and_stop_at_cap(cls_config):
    cfg = cls_config("federation.rounds=2", "privacy.target_epsilon=2")
    node = build_node(cfg)
    led = Ledger(ledger_path(cfg))
    spent = []
    for r in (1, 2):
        res = train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=led,
                          run_id="run-a", round_idx=r)
        assert len(led.entries(cfg.privacy.unit)) == r  # on disk when the result is returned
        assert res.epsilon == pytest.approx(led.spent(cfg.privacy.unit, res.delta))
        spent.append(res.epsilon)
    assert spent[0] < spent[1] <= 2.0 + 1e-9
    # A third round (e.g. a coordinator asking for more) would pass the node's cap: refused, nothing charged.
    state = get_adapter_state(node.model)
    with pytest.raises(BudgetExceededError):
        train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=led, run_id="run-a",
                    round_idx=3)
    assert len(led.entries(cfg.privacy.unit)) == 2
    after = get_adapter_state(node.model)
    assert all((state[k] == after[k]).all() for k in state)  # no training happened

    # A fresh process (new node object, same ledger file) continues from the spent budget.
    node2 = build_node(cfg)
    with pytest.raises(BudgetExceededError, match=r"spent so far ε=1\.9"):
        train_round(node2.model, node2.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=Ledger(ledger_path(cfg)),
                    run_id="run-b", round_idx=1)


def test_node_cap_wins_over_a_larger_target(cls_config):
    cfg = cls_config("privacy.target_epsilon=8", "privacy.max_epsilon=1")
    node = build_node(cfg)
    with pytest.raises(BudgetExceededError, match="max_epsilon=1"):
        train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=Ledger(ledger_path(cfg)))


def test_non_private_training_is_recorded_as_infinite_and_refused_under_a_cap(cls_config):
    capped = cls_config("privacy.enabled=false", "privacy.max_epsilon=5")
    node = build_node(capped)
    with pytest.raises(BudgetExceededError, match="no privacy guarantee"):
        train_round(node.model, node.train, round_spec(capped), unit=capped.privacy.unit, ledger=Ledger(ledger_path(capped)))
    cfg = cls_config("privacy.enabled=false")
    led = Ledger(ledger_path(cfg))
    res = train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=led)
    assert math.isinf(res.epsilon)
    # After a non-private release, no DP round on that dataset can claim a finite ε.
    with pytest.raises(BudgetExceededError, match="∞"):
        train_round(node.model, node.train, round_spec(cls_config()), unit=cfg.privacy.unit, ledger=led)


def test_ledger_show_cli(tmp_path):
    path = tmp_path / "ledger.json"
    led = Ledger(path)
    led.charge("hospital-a:abc", (1.0, 0.02, 100), delta=1e-5, num_examples=5000, run="r", round=1)
    led.charge("hospital-a:abc", (1.0, 0.02, 100), delta=1e-5, num_examples=5000, run="r", round=2)
    runner = CliRunner()
    res = runner.invoke(app, ["ledger", "show", str(path), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows[0]["unit"] == "hospital-a:abc" and rows[0]["rounds"] == 2 and rows[0]["steps"] == 200
    assert rows[0]["epsilon"] == pytest.approx(epsilon([(1.0, 0.02, 200)], 1e-5))
    table = runner.invoke(app, ["ledger", "show", str(path)])
    assert table.exit_code == 0 and "hospital-a:abc" in table.stdout
    missing = runner.invoke(app, ["ledger", "show", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_reservation_is_atomic_two_concurrent_rounds_cannot_both_pass_a_cap_that_admits_one(tmp_path):
    """Four processes reserve the same round at once against a cap that admits exactly one: the
    check and the write happen under one lock, so exactly one reservation lands (check-then-charge
    outside a lock let all of them through)."""
    path = tmp_path / "l.json"
    step = (1.0, 0.1, 50)
    one = epsilon([step], 1e-5)
    two = epsilon([step, step], 1e-5)
    cap = (one + two) / 2
    code = (
        "import sys, time; from fedslm.privacy import Ledger; from fedslm.errors import BudgetExceededError\n"
        "t = float(sys.argv[1])\n"
        "while time.time() < t: pass\n"
        "try:\n"
        f"    Ledger(r'{path}').reserve('u', {step!r}, delta=1e-5, max_epsilon={cap!r}, num_examples=100)\n"
        "    print('reserved')\n"
        "except BudgetExceededError:\n"
        "    print('refused')\n"
    )
    import time

    start = str(time.time() + 2.5)
    procs = [subprocess.Popen([sys.executable, "-c", code, start], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outs.count("reserved") == 1 and outs.count("refused") == 3, outs
    assert len(Ledger(path).entries("u")) == 1


def test_a_reserved_round_counts_before_training_and_a_crash_after_it_loses_budget_never_gains(cls_config):
    cfg = cls_config("federation.rounds=2", "privacy.target_epsilon=2")
    node = build_node(cfg)
    led = Ledger(ledger_path(cfg))
    seen = []

    def crash(result):  # training is over: the entry must already be on disk
        seen.append(len(led.entries(cfg.privacy.unit)))
        raise RuntimeError("the node dies before it releases")

    with pytest.raises(RuntimeError):
        train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=led, run_id="r",
                    round_idx=1, release=crash)
    assert seen == [1]
    (entry,) = led.entries(cfg.privacy.unit)
    assert "release" not in entry and led.spent(cfg.privacy.unit, entry["delta"]) > 0  # paid, nothing released


def test_budget_is_per_privacy_unit_not_per_content(cls_config, class_csv):
    """Another split seed, another held-out share, a subset, one more record: all the same people,
    all charged to one budget (the old ledger keyed by a hash of the split gave each a fresh one)."""
    base = ("federation.rounds=1", "privacy.target_epsilon=1", "privacy.max_epsilon=1.05")
    led_path = None
    for i, extra in enumerate([(), ("data.split_seed=5",), ("data.test_fraction=0.3",), ("data.max_train_records=60",)]):
        cfg = cls_config(*base, *extra)
        led_path = ledger_path(cfg)
        node = build_node(cfg)
        if i == 0:
            train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=Ledger(led_path))
            continue
        with pytest.raises(BudgetExceededError):
            train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=Ledger(led_path))
    class_csv.write_text(class_csv.read_text() + "fever cough,resp\n")  # one added record
    cfg = cls_config(*base)
    node = build_node(cfg)
    with pytest.raises(BudgetExceededError):
        train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=Ledger(led_path))
    assert [s.unit for s in Ledger(led_path).summary()] == ["all-records"]


def test_an_old_content_hash_ledger_is_refused_until_migrated_and_keeps_its_spend(tmp_path):
    path = tmp_path / "old.json"
    old = {"format": "fedslm-privacy-ledger/1", "datasets": {
        f"records.csv:{h}": {"num_examples": 100, "entries": [
            {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 50, "delta": 1e-5, "run": "r", "round": 1,
             "time": f"2026-11-0{i + 1}T00:00:00Z"}]} for i, h in enumerate(["aaa", "bbb"])}}
    path.write_text(json.dumps(old))
    with pytest.raises(LedgerError, match="ledger migrate"):
        Ledger(path).spent("all-records", 1e-5)
    res = CliRunner().invoke(app, ["ledger", "migrate", str(path), "--unit", "all-records"])
    assert res.exit_code == 0, res.output
    assert Ledger(path).spent("all-records", 1e-5) == pytest.approx(epsilon([(1.0, 0.1, 100)], 1e-5))


def test_ledger_show_composes_with_the_accountant_the_rounds_were_charged_with(tmp_path):
    """A node charging with PRV enforced its cap with PRV: `fedslm ledger show` says that ε by default
    (RDP, a looser bound of the same steps, only when asked), and names the accountant."""
    path = tmp_path / "ledger.json"
    ledger = Ledger(path)
    for r in range(3):
        ledger.reserve("all-records", (1.0, 1.0, 1), delta=1e-5, max_epsilon=50.0, num_examples=100,
                       run="r", round=r, accountant="prv")
    (spend,) = ledger.summary()
    assert spend.accountant == "prv"
    assert spend.epsilon == pytest.approx(epsilon([(1.0, 1.0, 3)], 1e-5, "prv"))
    assert ledger.summary("rdp")[0].epsilon > spend.epsilon
    shown = json.loads(CliRunner().invoke(app, ["ledger", "show", str(path), "--json"]).output)
    assert shown[0]["accountant"] == "prv" and shown[0]["epsilon"] == pytest.approx(spend.epsilon)
    rdp = json.loads(CliRunner().invoke(app, ["ledger", "show", str(path), "--json", "--accountant", "rdp"]).output)
    assert rdp[0]["accountant"] == "rdp" and rdp[0]["epsilon"] > spend.epsilon


# -- distributed-noise (Skellam) rounds ------------------------------------------------------------

SHARE = {"mu": 4.0e8, "honest": 5, "l1": 8448 ** 0.5 * 2 ** 13 + 8448, "l2": 2 ** 13 + 8448 ** 0.5}


def test_a_distributed_round_is_charged_for_the_sum_as_assumed_and_for_the_nodes_noise_alone(tmp_path):
    from fedslm.privacy import skellam

    ledger = Ledger(tmp_path / "l.json")
    for r in range(3):
        ledger.reserve("u", (0.4, 1.0, 1), delta=1e-6, max_epsilon=100, num_examples=50, round=r, skellam=SHARE,
                       max_epsilon_alone=100)
    sum_ = skellam.epsilon([(5 * SHARE["mu"], SHARE["l1"], SHARE["l2"], 3)], 1e-6)
    alone = skellam.epsilon([(SHARE["mu"], SHARE["l1"], SHARE["l2"], 3)], 1e-6)
    assert ledger.spent("u", 1e-6) == pytest.approx(sum_, rel=1e-12)
    assert ledger.spent("u", 1e-6, alone=True) == pytest.approx(alone, rel=1e-12)
    assert alone > 1.8 * sum_  # a fifth of the variance: about √5 times the ε
    (row,) = ledger.summary()
    assert row.epsilon == pytest.approx(sum_) and row.epsilon_alone == pytest.approx(alone)
    out = CliRunner().invoke(app, ["ledger", "show", str(ledger.path)])
    assert f"{alone:.3f}" in out.output and f"{sum_:.3f}" in out.output
    (shown,) = json.loads(CliRunner().invoke(app, ["ledger", "show", str(ledger.path), "--json"]).output)
    assert shown["epsilon_alone"] == pytest.approx(alone)


def test_both_caps_refuse_a_distributed_round_and_write_nothing(tmp_path):
    from fedslm.privacy import skellam

    ledger = Ledger(tmp_path / "l.json")
    one_sum = skellam.epsilon([(5 * SHARE["mu"], SHARE["l1"], SHARE["l2"], 1)], 1e-6)
    one_alone = skellam.epsilon([(SHARE["mu"], SHARE["l1"], SHARE["l2"], 1)], 1e-6)
    with pytest.raises(BudgetExceededError, match="own noise alone, past this node's cap max_epsilon_alone"):
        ledger.reserve("u", (0.4, 1.0, 1), delta=1e-6, max_epsilon=100, num_examples=50, skellam=SHARE,
                       max_epsilon_alone=one_alone * 0.99)
    with pytest.raises(BudgetExceededError, match="max_epsilon="):
        ledger.reserve("u", (0.4, 1.0, 1), delta=1e-6, max_epsilon=one_sum * 0.99, num_examples=50, skellam=SHARE,
                       max_epsilon_alone=100)
    assert ledger.entries("u") == []
    ledger.reserve("u", (0.4, 1.0, 1), delta=1e-6, max_epsilon=one_sum * 1.01, num_examples=50, skellam=SHARE,
                   max_epsilon_alone=one_alone * 1.01)
    assert len(ledger.entries("u")) == 1


def test_gaussian_and_distributed_rounds_of_one_unit_compose_together(tmp_path):
    from fedslm.privacy import skellam

    ledger = Ledger(tmp_path / "l.json")
    ledger.reserve("u", (1.0, 0.1, 50), delta=1e-6, max_epsilon=100, num_examples=50)
    gaussian_only = ledger.spent("u", 1e-6)
    ledger.reserve("u", (0.4, 1.0, 1), delta=1e-6, max_epsilon=100, num_examples=50, skellam=SHARE)
    both = ledger.spent("u", 1e-6)
    sum_only = skellam.epsilon([(5 * SHARE["mu"], SHARE["l1"], SHARE["l2"], 1)], 1e-6)
    expected = skellam.epsilon([(5 * SHARE["mu"], SHARE["l1"], SHARE["l2"], 1)], 1e-6,
                               extra_rdp=skellam.gaussian_rdp(1.0, 0.1, 50))
    assert both == pytest.approx(expected, rel=1e-12)
    assert both > max(gaussian_only, sum_only)
    # The Gaussian history alone is still Opacus' figure (the DP-SGD rounds are not re-read as Skellam).
    assert ledger.history("u") == [(1.0, 0.1, 50)]


# -- malformed and non-finite entries: one line naming the entry, never a traceback or a hang ----------------------

@contextlib.contextmanager
def _within(seconds: int):
    """Fail, rather than hang, if the block runs longer than ``seconds``."""
    def hung(signum, frame):  # noqa: ARG001
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


_GOOD = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "delta": 1e-5, "run": "r", "round": 1}


def _bad_entry(**change):
    entry = {**_GOOD, **change}
    return {k: v for k, v in entry.items() if v is not ...}


@pytest.mark.parametrize("entry,field", [
    (_bad_entry(noise_multiplier=float("nan")), "noise_multiplier"),
    (_bad_entry(noise_multiplier=float("inf")), "noise_multiplier"),
    (_bad_entry(sample_rate=float("nan")), "sample_rate"),
    (_bad_entry(sample_rate=float("-inf")), "sample_rate"),
    (_bad_entry(steps=float("nan")), "steps"),
    (_bad_entry(steps=1.5), "steps"),
    (_bad_entry(delta=float("inf")), "delta"),
    (_bad_entry(noise_multiplier="1.0"), "noise_multiplier"),
    (_bad_entry(sample_rate=...), "sample_rate"),
    (_bad_entry(mechanism="skellam"), "mu"),
    ("not an entry", None),
], ids=["sigma-nan", "sigma-inf", "q-nan", "q-minus-inf", "steps-nan", "steps-fraction", "delta-inf",
        "sigma-string", "q-missing", "skellam-without-mu", "not-a-mapping"])
def test_a_malformed_or_non_finite_ledger_entry_is_refused_in_one_line_naming_it(tmp_path, entry, field):
    """A NaN σ in the ledger made composition loop forever, a NaN q read as ε = 0 (a reset budget), a missing
    field gave a traceback. Every one is refused, in one line that names the file, the unit, the entry and the
    field: by `fedslm ledger show`, and by the ledger before any round is reserved."""
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"format": "fedslm-privacy-ledger/2", "units": {"all-records": {
        "num_examples": 100, "entries": [_GOOD, entry]}}}))
    with _within(60):
        res = CliRunner().invoke(app, ["ledger", "show", str(path)])
    assert not isinstance(res.exception, TimeoutError), "`fedslm ledger show` hangs on this entry"
    with _within(60), pytest.raises(LedgerError) as refused:
        Ledger(path).reserve("all-records", (1.0, 0.1, 10), delta=1e-5, max_epsilon=10, num_examples=100)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    for text in (res.output, str(refused.value)):
        assert str(path) in text and "'all-records', entry 1" in text
        assert field is None or f"'{field}'" in text
    assert len(json.loads(path.read_text())["units"]["all-records"]["entries"]) == 2  # nothing written


@pytest.mark.parametrize("text", ["{ not json", "[" * 100_000 + "]" * 100_000,
                                  '{"format": "fedslm-privacy-ledger/2", "units": {"u": {"entries": 5}}}',
                                  '{"format": "fedslm-privacy-ledger/2", "units": {"u": {"entries": [], '
                                  '"num_examples": NaN}}}'],
                         ids=["malformed-json", "nested-too-deep", "entries-not-a-list", "num-examples-nan"])
def test_an_unreadable_ledger_is_one_line_at_the_cli(tmp_path, text):
    path = tmp_path / "ledger.json"
    path.write_text(text)
    res = CliRunner().invoke(app, ["ledger", "show", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and str(path) in res.output, res.output


def test_the_ledger_file_is_the_json_of_its_data_with_one_line_per_entry(tmp_path):
    """write_json's text (fedslm.privacy.ledger.json_text) reads back as the very data, keys, strings
    and floats included, and a ledger's entries are one line each (readable, and written by json's C
    encoder)."""
    import json

    from fedslm.privacy.ledger import json_text, write_json

    data = {"format": "f/2", "units": {"all-records": {"num_examples": 3, "entries": [
        {"id": "a", "noise_multiplier": 0.1 + 0.2, "delta": 1e-300, "release": {"file": "x\n\"y\""}},
        {"id": "b", "noise_multiplier": float("inf"), "tags": [], "meta": {}}]}}, "empty": [], "none": None,
        "ünïcode": "é"}
    path = tmp_path / "ledger.json"
    write_json(path, data)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == data and text == json_text(data)
    entry_lines = [line for line in text.splitlines() if line.lstrip().startswith('{"id"')]
    assert [json.loads(line.strip().rstrip(","))["id"] for line in entry_lines] == ["a", "b"]
    assert json.loads(json_text([1, [2, [3, [4, [5]]]]])) == [1, [2, [3, [4, [5]]]]]


def test_ledger_json_keys_are_written_as_json_writes_them_and_others_are_refused():
    import json

    import pytest

    from fedslm.privacy.ledger import json_text

    data = {True: 1, None: 2, 1.5: 3, float("inf"): 4, 7: {False: []}, "k": 5}
    assert json.loads(json_text(data)) == json.loads(json.dumps(data))
    with pytest.raises(TypeError, match="tuple"):
        json_text({(1, 2): 3})
