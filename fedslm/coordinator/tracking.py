"""Every round also where researchers already look: MLflow's tracking store and TensorBoard event files.

``output.tracking: [mlflow, tensorboard]`` (the ``tracking`` extra: ``pip install 'fedslm[tracking]'``).
Both are offline: MLflow writes a local SQLite store (``output.mlflow_uri``, default
``sqlite:///RUN_DIR/mlflow.db``; ``mlflow ui --backend-store-uri`` of it reads it), TensorBoard writes
event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir``). What is logged is what the run
folder's ``metrics.jsonl`` line for the round holds, nothing more (so a deployed node's withheld
metrics stay withheld): the weighted held-out metrics, each institution's metrics and ε, bytes up
and down, the round's seconds, replies and errors; the resolved config as parameters (MLflow) and as
text (TensorBoard); the summary's final figures at the end.

A tracker that fails (a full disk, a locked store) logs one warning and stops tracking; the run and
its own files go on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("fedslm.tracking")

TRACKERS = ("mlflow", "tensorboard")


def round_metrics(line: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line as flat, finite scalars (withheld values, sent as -1 or null, are left out)."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if math.isfinite(value) and value != -1:
            out[key] = float(value)

    for key, value in (line.get("eval_weighted") or {}).items():
        put(f"eval/{key}", value)
    clients = line.get("clients") or []
    for c in clients:
        inst = c.get("institution")
        for key in ("epsilon", "train_loss", "bytes_up", "bytes_down", "num_examples"):
            put(f"institution_{inst}/{key}", c.get(key))
        for key, value in (c.get("eval") or {}).items():
            if key in ("accuracy", "loss", "macro_f1", "perplexity"):
                put(f"institution_{inst}/eval_{key}", value)
    put("round/seconds", line.get("round_seconds"))
    put("round/replies", len(clients))
    put("round/errors", len(line.get("errors") or []))
    put("round/bytes_up", sum(c.get("bytes_up", 0) or 0 for c in clients))
    put("round/bytes_down", sum(c.get("bytes_down", 0) or 0 for c in clients))
    return out


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:500]


class _MLflow:
    def __init__(self, uri: str, out: Path, run_id: str, config: Mapping[str, Any]):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("fedslm")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("fedslm")
        run = self.client.create_run(experiment_id, run_name=out.name, tags={"fedslm.run_id": run_id,
                                                                               "fedslm.run_dir": str(out)})
        self.run_id = run.info.run_id
        params: dict[str, str] = {}
        _flat("", config, params)
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class _TensorBoard:
    def __init__(self, folder: Path, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("config", "```\n" + config_yaml + "\n```", 0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class Trackers:
    """The trackers ``output.tracking`` names, fed one metrics.jsonl line per round."""

    def __init__(self, cfg: Any, out: Path, run_id: str):
        self.active: dict[str, Any] = {}
        names = list(cfg.output.tracking or [])
        if not names:
            return
        from fedslm.config import to_yaml

        import yaml

        text = to_yaml(cfg)
        for name in names:
            try:
                if name == "mlflow":
                    uri = cfg.output.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
                    self.active[name] = _MLflow(uri, out, run_id, yaml.safe_load(text))
                elif name == "tensorboard":
                    self.active[name] = _TensorBoard(out / "tensorboard", text)
            except ImportError:
                log.warning("output.tracking lists %s, which is not installed (pip install 'fedslm[tracking]'); "
                            "not tracking to it", name)
            except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
                log.warning("output.tracking: %s could not start (%s); not tracking to it", name, exc)

    def log_round(self, line: Mapping[str, Any]) -> None:
        if not self.active:
            return
        metrics = round_metrics(line)
        self._each("log", int(line["round"]), metrics)

    def log_summary(self, summary: Mapping[str, Any], step: int) -> None:
        final: dict[str, float] = {}
        for key, value in (summary.get("final") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                final[f"final/{key}"] = float(value)
        worst = summary.get("worst_institution") or {}
        for key, value in worst.items():
            if key != "institution" and isinstance(value, (int, float)):
                final[f"final/worst_institution_{key}"] = float(value)
        if final:
            self._each("log", step, final)

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)
        self.active.clear()

    def _each(self, method: str, *args: Any) -> None:
        for name in list(self.active):
            try:
                getattr(self.active[name], method)(*args)
            except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
                log.warning("output.tracking: %s failed (%s); no longer tracking to it", name, exc)
                self.active.pop(name, None)

