"""output.tracking: every round's metrics.jsonl line, read back with MLflow's and TensorBoard's own readers."""

from __future__ import annotations

import json

import pytest

from fedslm.errors import ConfigError
from fedslm.coordinator.server import RunRecorder


def _pending(recorder, server_round, accuracy, withheld=False):
    recorder.pending[server_round] = {
        "round": server_round, "errors": [{"phase": "train", "node": 9, "reason": "x"}] if server_round == 2 else [],
        "started": 0.0,
        "clients": {k: {"institution": k, "epsilon": -1 if withheld else 1.0 * server_round + k, "bytes_up": 100,
                        "bytes_down": 200, "eval": {"accuracy": accuracy + 0.1 * k, "loss": 1.0, "num_examples": 10}}
                    for k in range(2)}}


def test_every_round_reaches_mlflow_and_tensorboard_and_reads_back_the_same(cls_config, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    out.mkdir()
    cfg = cls_config(f"output.dir={out}", "output.tracking=[mlflow,tensorboard]")
    recorder = RunRecorder(cfg, out, "run-t")
    for r, acc in ((1, 0.5), (2, 0.6)):
        _pending(recorder, r, acc, withheld=(r == 2))
        recorder._flush(r)
    recorder.finish_tracking({"final": {"accuracy": 0.65}})
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedslm").experiment_id])
    assert run.data.tags["fedslm.run_id"] == "run-t" and run.info.status == "FINISHED"
    assert run.data.params["federation.rounds"] == str(cfg.federation.rounds)

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    assert history("eval/accuracy") == [(r["round"], pytest.approx(r["eval_weighted"]["accuracy"])) for r in lines]
    assert history("institution_1/eval_accuracy") == [(1, pytest.approx(0.6)), (2, pytest.approx(0.7))]
    assert history("institution_0/epsilon") == [(1, 1.0)]  # round 2's ε was withheld (-1): not logged
    assert history("round/errors") == [(1, 0.0), (2, 1.0)] and history("final/accuracy") == [(2, 0.65)]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    got = [(s.step, s.value) for s in events.Scalars("eval/accuracy")]
    assert got == [(r["round"], pytest.approx(r["eval_weighted"]["accuracy"])) for r in lines]
    assert [s.step for s in events.Scalars("institution_0/epsilon")] == [1]


def test_an_unknown_tracker_is_a_config_error_naming_the_key(cls_config):
    with pytest.raises(ConfigError, match="output.tracking lists"):
        cls_config("output.tracking=[wandb]")
