"""The coordinator: Flower's own strategies over adapter tensors, and the run folder.

Strategies are Flower's (FedAvg weighted by examples, FedProx, FedAdam, and the robust
FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan), each wrapped by :class:`Recording`, which
trusts no reply: it screens every update (:mod:`fedslm.coordinator.screen`) and every reply's
metrics (:mod:`fedslm.coordinator.metrics`), decides each reply's weight and identity itself,
drops a failed or malformed reply (logged with its node and reason) and never the run (an
aggregation that raises is retried without the reply it fails on), stops the run when fewer
than ``federation.min_clients`` replies remain, and writes the run folder as rounds finish: ``metrics.jsonl`` (one
object per round), a checkpoint of the global adapter and server state, then
``adapter/``, ``summary.json``, ``report.png`` and ``report.html`` (rewritten every round).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import yaml
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum
from safetensors.torch import load_file, save_file

from fedslm.config import Config, to_yaml
from fedslm.data import bundled, load_task_data
from fedslm.errors import ConfigError, FedslmError
from fedslm.wire import codec
from fedslm.coordinator.secagg import SecureAggregationGrid, secure_aggregation_summary
from fedslm.coordinator.screen import check_update, default_max_update_norm
from fedslm.coordinator.bulyan import Bulyan
from fedslm.coordinator.metrics import WEIGHT as METRIC_WEIGHT
from fedslm.coordinator.metrics import Labels, canonical, screen as screen_metrics, weights as coordinator_weights
from fedslm.lora import adapter_meta, get_adapter_state, save_adapter, set_adapter_state, wrap
from fedslm.lora.adapter import frozen_digest
from fedslm.models import load_base
from fedslm.coordinator.client_level import client_level_strategy, client_level_summary
from fedslm.privacy.dpsgd import check_secure_mode
from fedslm.registry import Registry

log = logging.getLogger("fedslm.server")

STRATEGIES: Registry[type] = Registry("strategy")
STRATEGIES.register("fedavg", FedAvg)
STRATEGIES.register("fedprox", FedProx)
STRATEGIES.register("fedadam", FedAdam)
# Robust aggregation (Flower's Message-API strategies): each bounds how far a minority of members can
# move the aggregate, and each averages unweighted (a size is a claim).
STRATEGIES.register("median", FedMedian)
STRATEGIES.register("trimmed_mean", FedTrimmedAvg)
STRATEGIES.register("krum", Krum)
STRATEGIES.register("multi_krum", MultiKrum)
STRATEGIES.register("bulyan", Bulyan)
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan")


CHECKPOINT = "checkpoint"


class FederationStopped(FedslmError):
    """Too few institutions replied for the round to count."""


class RunFolderError(FedslmError):
    """The run folder holds something this run must not overwrite or continue."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    run_id: str
    adapter: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def find_checkpoint(out: Path, cfg: Config) -> Optional[Checkpoint]:
    """The checkpoint to resume in run folder ``out``, or None for a fresh run.

    Refuses a finished run, a checkpoint made with a different config (naming the keys that
    differ), and any checkpoint when ``output.resume`` is false.
    """
    state_file = out / CHECKPOINT / "state.json"
    if (out / "summary.json").exists():
        raise RunFolderError(f"run folder {out} already holds a finished run (summary.json); choose a new output.dir")
    if not state_file.exists():
        if (out / "metrics.jsonl").exists() and not cfg.output.resume:
            raise RunFolderError(f"run folder {out} already holds a run (metrics.jsonl); choose a new output.dir")
        return None
    if not cfg.output.resume:
        raise RunFolderError(f"run folder {out} holds an unfinished run's checkpoint and output.resume=false; "
                             "choose a new output.dir, or set output.resume=true to continue it")
    before = _flat(yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")))
    now = _flat(yaml.safe_load(to_yaml(cfg)))
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k != "output.resume")
    if differ:
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in differ[:5])
        raise RunFolderError(f"run folder {out} holds a checkpoint of a different config: {shown}; resume with the "
                             "same config, or choose a new output.dir")
    meta = json.loads(state_file.read_text(encoding="utf-8"))
    strategy_file = out / CHECKPOINT / "strategy.safetensors"
    return Checkpoint(
        round=int(meta["round"]), run_id=str(meta["run_id"]),
        adapter=load_file(str(out / CHECKPOINT / "adapter.safetensors")),
        strategy_state=load_file(str(strategy_file)) if strategy_file.exists() else {},
    )


def _finite(value: Any) -> Any:
    """None for what cannot be shown: inf, NaN, or a value a deployed node withheld (codec.WITHHELD)."""
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == codec.WITHHELD:
        return None
    return value


def _save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class RunRecorder:
    cfg: Config
    out: Path
    run_id: str
    started: float = field(default_factory=time.perf_counter)
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    _last_end: float = 0.0
    # message id -> node id of what was sent, so a failure reported by the SuperLink on a dead
    # node's behalf (it signs such replies itself) is pinned on the right node.
    sent: list[Message] = field(default_factory=list)
    trackers: Any = None  # fedslm.coordinator.tracking.Trackers, started with the first round
    labels: Labels = field(default_factory=Labels)  # node id -> the institution label shown for it

    def node_of(self, reply: Message) -> int:
        # Message ids are assigned when the grid sends, so look them up now, not at configure time.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
        return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def remember(self, messages: Iterable[Message]) -> list[Message]:
        self.sent = list(messages)
        return self.sent

    def _round(self, server_round: int) -> dict[str, Any]:
        return self.pending.setdefault(server_round, {"round": server_round, "clients": {}, "errors": [],
                                                      "started": self._last_end})

    def _split(self, server_round: int, replies: Iterable[Message], phase: str) -> list[tuple[Message, dict[str, Any]]]:
        """The round's replies that may count, with their screened metrics; failed, malformed and
        repeated replies are logged with their node and dropped. Stops the run below min_clients."""
        rec = self._round(server_round)
        valid: list[tuple[Message, dict[str, Any]]] = []
        seen: set[int] = set()
        secure = phase == "train" and self.cfg.federation.secure_aggregation
        for msg in replies:
            node = self.node_of(msg)
            if not msg.has_error() and node != msg.metadata.src_node_id:
                # A node answering a message that was sent to another node: never let it speak for that node.
                self.error(server_round, phase, msg.metadata.src_node_id,
                           f"rejected reply: it answers the message sent to node {node}")
                continue
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                log.warning("round %s %s: node %s failed: %s", server_round, phase, node, reason)
                rec["errors"].append({"phase": phase, "node": node, "reason": reason})
                continue
            clean, why = screen_metrics(msg, phase, secure=secure)
            if clean is None:
                self.error(server_round, phase, node, f"rejected reply: {why}")
                continue
            if node in seen:  # one node, one voice: a second reply would count its update twice
                self.error(server_round, phase, node, "rejected reply: a second reply from this node in one round")
                continue
            seen.add(node)
            valid.append((msg, clean))
        if len(valid) < self.cfg.federation.min_clients:
            reasons = "; ".join(e["reason"] for e in rec["errors"] if e["phase"] == phase) or "no replies in time"
            self.pending[server_round]["stopped"] = True
            self._flush(server_round)
            raise FederationStopped(
                f"round {server_round} {phase}: {len(valid)} institution(s) replied, fewer than "
                f"federation.min_clients={self.cfg.federation.min_clients}; stopping. Reasons: {reasons}"
            )
        return valid

    def _weights(self, kept: list[tuple[Message, dict[str, Any]]], equal: bool) -> list[float]:
        fed = self.cfg.federation
        return coordinator_weights([float(m["num-examples"]) for _, m in kept], equal=equal or fed.weighting == "equal",
                                   max_ratio=fed.max_weight_ratio, max_weight=fed.max_weight)

    def reject_bad_updates(self, server_round: int, replies: list[Message],
                           global_state: Optional[dict[str, Any]], limit: Optional[float] = None) -> list[Message]:
        """Turn replies whose update fails the checks into logged rejections.

        ``limit``: a tighter norm bound the nodes were told to clip to (client-side clipping).
        """
        if global_state is None:
            return replies
        bound = self.cfg.federation.max_update_norm or default_max_update_norm(
            self.cfg, sum(t.numel() for t in global_state.values()))
        if limit is not None:
            bound = min(bound, limit)
        max_bytes = self.cfg.federation.max_message_bytes or 2 * codec.tensor_bytes(global_state) + 2**20
        rec = self._round(server_round)
        kept = []
        for msg in replies:
            if not msg.has_error():
                try:
                    size = codec.content_bytes(msg)
                    if size > max_bytes:
                        reason = f"oversized message: {size} bytes, limit {max_bytes} (federation.max_message_bytes)"
                    else:
                        reason = check_update(global_state, codec.reply_state(msg), bound)
                except Exception as exc:  # noqa: BLE001 - whatever a reply holds, it costs that reply only
                    reason = f"unreadable update ({type(exc).__name__}: {exc})"
                if reason is not None:
                    node = self.node_of(msg)
                    log.warning("round %s train: rejected update from node %s: %s", server_round, node, reason)
                    rec["errors"].append({"phase": "train", "node": node, "reason": f"rejected update: {reason}"})
                    continue
            kept.append(msg)
        return kept

    def note(self, server_round: int, key: str, values: Any) -> None:
        """Something the round's line in ``metrics.jsonl`` should carry under ``key``."""
        self._round(server_round)[key] = values

    def error(self, server_round: int, phase: str, node: int, reason: str) -> None:
        log.warning("round %s %s: node %s failed: %s", server_round, phase, node, reason)
        self._round(server_round)["errors"].append({"phase": phase, "node": node, "reason": reason})

    def stop(self, server_round: int, phase: str, reason: str) -> None:
        self._round(server_round)["stopped"] = True
        self._flush(server_round)
        if self.trackers is not None:
            self.trackers.close("FAILED")
        raise FederationStopped(f"round {server_round} {phase}: {reason}; stopping")

    def _entries(self, server_round: int, kept: list[tuple[Message, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Each kept reply's entry in the round record, keyed by the node the SuperLink authenticated;
        the reply's ``institution`` is only a label that can never name another node's entry."""
        nodes = [self.node_of(msg) for msg, _ in kept]
        labels = self.labels.assign({n: m.get("institution") for n, (_, m) in zip(nodes, kept)})
        clients = self._round(server_round)["clients"]
        return [clients.setdefault(n, {"institution": labels[n], "node": n}) for n in nodes]

    def on_train(self, server_round: int, replies: Iterable[Message], *, equal: bool = False) -> list[Message]:
        """Screen, record and weigh the round's train replies; returns them rewritten for aggregation
        (:func:`fedslm.coordinator.metrics.canonical`). ``equal``: every reply weighs 1."""
        kept = self._split(server_round, replies, "train")
        weights = self._weights(kept, equal)
        for entry, (msg, m), weight in zip(self._entries(server_round, kept), kept, weights):
            entry.update({
                "train_loss": _finite(m.get("train-loss")), "epsilon": _finite(m.get("epsilon")),
                "delta": _finite(m.get("delta")), "num_examples": int(m["num-examples"]), "weight": weight,
                "bytes_up": int(m.get("bytes-up", 0)), "bytes_down": int(m.get("bytes-down", 0)),
                "steps": int(m.get("steps", 0)), "empty_steps": _finite(m.get("empty-steps")),
                "noise_multiplier": _finite(m.get("noise-multiplier")), "train_seconds": _finite(m.get("train-seconds")),
                "train_handler_seconds": _finite(m.get("seconds")),
            })
            if m.get("replayed"):  # an update this node had already paid for, sent again after a resume
                entry["replayed"] = True
            if m.get("epsilon-alone") is not None:  # distributed noise: ε of this node's own noise alone
                entry["epsilon_alone"] = _finite(m.get("epsilon-alone"))
            canonical(msg, m, weight)
        return [msg for msg, _ in kept]

    def on_evaluate(self, server_round: int, replies: Iterable[Message], *, equal: bool = False) -> list[Message]:
        kept = self._split(server_round, replies, "evaluate")
        weights = self._weights(kept, equal)
        for entry, (msg, m), weight in zip(self._entries(server_round, kept), kept, weights):
            entry["eval"] = {**{k.replace("-", "_"): _finite(v) for k, v in m.items()
                                if k not in ("institution", codec.UNIT_WEIGHT)}, "weight": weight}
            canonical(msg, m, weight)
        self._flush(server_round)
        return [msg for msg, _ in kept]

    def checkpoint(self, server_round: int, arrays: ArrayRecord,
                   strategy_state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The global adapter and server state after ``server_round`` (0: the initial adapter).

        Written after the round's line in ``metrics.jsonl``, so a checkpoint never runs ahead of it.
        """
        folder = self.out / CHECKPOINT
        folder.mkdir(parents=True, exist_ok=True)
        _save_tensors(folder / "adapter.safetensors", codec.record_to_state(arrays))
        _save_tensors(folder / "strategy.safetensors", strategy_state or {})
        _atomic_write(folder / "state.json", json.dumps({
            "round": server_round, "run_id": self.run_id, "strategy": self.cfg.federation.strategy,
            "rounds_planned": self.cfg.federation.rounds,
        }).encode())

    def restore(self, done: int) -> None:
        """Continue a run folder whose rounds 1..``done`` are checkpointed: keep their metrics lines only."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [rec for rec in (json.loads(line) for line in lines if line.strip()) if rec["round"] <= done]
        _atomic_write(path, "".join(json.dumps(rec) + "\n" for rec in kept).encode())
        self.rounds = kept
        for rec in kept:  # each node keeps the label it had before the resume
            for c in rec["clients"]:
                if "node" in c and c["node"] not in self.labels.of:
                    self.labels._give(c["node"], c["institution"])
        self._last_end = kept[-1]["wall_seconds"] if kept else 0.0
        self.started = time.perf_counter() - self._last_end

    def _flush(self, server_round: int) -> None:
        rec = self.pending.pop(server_round, None)
        if rec is None:
            return
        clients = sorted(rec["clients"].values(), key=lambda c: (c["institution"], c.get("node", 0)))
        evals = [c["eval"] for c in clients if "eval" in c]
        weighted: dict[str, float] = {}
        partial: dict[str, list[int]] = {}
        # Weighted by the coordinator's own weights (screened, clamped claims), never a reply's number, over
        # the institutions that released the figure: one member withholding it must not erase everyone's.
        for key in ("loss", "accuracy", "macro_f1", "perplexity"):
            shown = [e for e in evals if e.get(key) is not None]
            weight = [e.get("weight", e.get("num_examples") or 0) for e in shown]  # records written before weights
            if shown and sum(weight):
                weighted[key] = sum(e[key] * w for e, w in zip(shown, weight)) / sum(weight)
                if len(shown) < len(evals):
                    partial[key] = [len(shown), len(evals)]
        now = time.perf_counter() - self.started
        line = {"round": server_round, "run_id": self.run_id, "clients": clients, "eval_weighted": weighted,
                **({"eval_weighted_over": partial} if partial else {}),
                "errors": rec["errors"], "stopped": rec.get("stopped", False),
                **{k: rec[k] for k in ("client_level", "secure_aggregation") if k in rec},
                "wall_seconds": now, "round_seconds": now - rec["started"]}
        self._last_end = now
        self.rounds.append(line)
        with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.write_page()
        self.track(line)

    def track(self, line: dict[str, Any]) -> None:
        if not self.cfg.output.tracking:
            return
        if self.trackers is None:
            from fedslm.coordinator.tracking import Trackers

            self.trackers = Trackers(self.cfg, self.out, self.run_id)
        self.trackers.log_round(line)

    def finish_tracking(self, summary: dict[str, Any]) -> None:
        if self.trackers is not None:
            self.trackers.log_summary(summary, step=max((r["round"] for r in self.rounds), default=0))
            self.trackers.close()

    def write_page(self) -> None:
        """report.html, rewritten after every round: a page must never stop the run."""
        from fedslm.report_html import write_html

        try:
            write_html(self.out)
        except Exception as exc:  # noqa: BLE001 - the run's files are what counts; the page is a view of them
            log.warning("report.html not written: %s", exc)


class Recording:
    """Mixed in front of a Flower strategy: check updates, record replies, enforce min_clients.

    ``offset`` is the number of rounds a resumed run had already finished: Flower's loop counts
    from 1 again, and every round number it passes on is shifted so nodes, ledgers and metrics
    see the run's own round numbers.
    """

    recorder: RunRecorder
    offset: int = 0
    # Set by client-side clipping: updates over the bound the nodes were sent are rejected.
    update_norm_limit: Optional[float] = None
    sent: Optional[dict[str, Any]] = None  # the global adapter sent this round, to check updates against

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any):
        self.sent = codec.record_to_state(arrays)
        wire = codec.transfer_record(arrays, self.recorder.cfg.federation.transfer_dtype)
        return self.recorder.remember(
            super().configure_train(server_round + self.offset, wire, config, grid))  # type: ignore[misc]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any):
        # Flower calls this once a round with the published global adapter (after any client-level DP
        # noise of a wrapper): the one place to average what was published, never what was not.
        if self.recorder.cfg.federation.ema is not None and server_round > 0:
            self._average(arrays)
        wire = codec.transfer_record(self.published(arrays), self.recorder.cfg.federation.transfer_dtype)
        return self.recorder.remember(
            super().configure_evaluate(server_round + self.offset, wire, config, grid))  # type: ignore[misc]

    _screened: int = -1  # the (shifted) round whose replies were already screened by a wrapper
    # Every reply weighs 1 (client-level DP, robust strategies): set by make_strategies.
    equal_weights: bool = False
    robust: bool = False

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Reject bad updates, failed and malformed replies (logged), record and weigh the rest;
        ``server_round`` is shifted."""
        checked = self.recorder.reject_bad_updates(server_round, list(replies), self.sent, self.update_norm_limit)
        self._screened = server_round
        valid = self.recorder.on_train(server_round, checked, equal=self.equal_weights)
        if self.recorder.cfg.federation.transfer_dtype != "float32":
            for reply in valid:  # averaged (and clipped) in float32, whatever the wire carried
                reply.content[codec.ARRAYS] = codec.state_to_record(codec.transfer(codec.reply_state(reply), "float32"))
        return valid

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        valid = list(replies) if self._screened == server_round else self.screen(server_round, replies)
        self._per_round(len(valid))
        if self.robust and self.sent is not None:
            # Robust rules are translation-equivariant: run them on the updates (reply - global), whose
            # distances do not cancel against the adapter's own size.
            sent = {k: v.detach().double().numpy() for k, v in self.sent.items()}
            for reply in valid:
                reply.content[codec.ARRAYS] = ArrayRecord({
                    k: Array(a.numpy().astype(np.float64) - sent[k]) for k, a in reply.content[codec.ARRAYS].items()})
            arrays, metrics = self._guarded(server_round, "train", valid,
                                            lambda rs: super(Recording, self).aggregate_train(server_round, rs))
            if arrays is not None:
                dtypes = {k: v.dtype for k, v in self.sent.items()}
                arrays = codec.state_to_record({k: torch.from_numpy(a.numpy() + sent[k]).to(dtypes[k])
                                                for k, a in arrays.items()})
            return arrays, metrics
        arrays, metrics = self._guarded(server_round, "train", valid,
                                        lambda rs: super(Recording, self).aggregate_train(server_round, rs))
        if arrays is not None and self.sent is not None:
            # The global adapter keeps its dtypes: one float64 reply must not promote it for every node.
            dtypes = {k: v.dtype for k, v in self.sent.items()}
            state = codec.record_to_state(arrays)
            if any(state[k].dtype != dtypes[k] for k in dtypes if k in state):
                arrays = codec.state_to_record({k: v.to(dtypes.get(k, v.dtype)) for k, v in state.items()})
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        valid = self.recorder.on_evaluate(server_round, list(replies),
                                          equal=self.robust or self.recorder.cfg.federation.weighting == "equal")
        return self._guarded(server_round, "evaluate", valid,
                             lambda rs: super(Recording, self).aggregate_evaluate(server_round, rs))

    def _per_round(self, n: int) -> None:
        """Settings that follow the round's number of replies (multi_krum: n - f selected unless set)."""
        fed = self.recorder.cfg.federation
        if fed.strategy == "multi_krum":
            self.num_nodes_to_select = fed.krum_select or max(1, n - fed.byzantine)

    def _guarded(self, server_round: int, phase: str, replies: list[Message], aggregate: Any) -> Any:
        """``aggregate(replies)``; if it raises, the same without the first reply it works without
        (logged as that node's rejection), else nothing this round (logged): the run goes on either way.

        Each try gets fresh copies of the records, as Flower's strategies pop arrays out of them."""
        empty: Any = (None, None) if phase == "train" else None
        if not replies:
            return empty
        originals = [msg.content for msg in replies]

        def attempt(keep: list[int]) -> Any:
            for i in keep:
                replies[i].content = RecordDict({name: (ArrayRecord(dict(rec.items())) if isinstance(rec, ArrayRecord)
                                                        else rec) for name, rec in originals[i].items()})
            return aggregate([replies[i] for i in keep])

        try:
            return attempt(list(range(len(replies))))
        except FederationStopped:
            raise
        except Exception as exc:  # noqa: BLE001 - one reply must never end the ServerApp
            first = f"{type(exc).__name__}: {exc}"
        for drop in range(len(replies)):
            keep = [i for i in range(len(replies)) if i != drop]
            if not keep:
                break
            try:
                result = attempt(keep)
            except FederationStopped:
                raise
            except Exception:  # noqa: BLE001 - try the next one
                continue
            self.recorder.error(server_round, phase, self.recorder.node_of(replies[drop]),
                                f"rejected reply: aggregation failed with it ({first})")
            return result
        self.recorder.error(server_round, phase, -1, f"aggregation failed ({first}); nothing aggregated this round, "
                                                     "the global adapter stays as it was")
        return empty

    averaged: Optional[dict[str, np.ndarray]] = None  # federation.ema: the moving average of the global adapter

    def _average(self, arrays: ArrayRecord) -> None:
        beta = float(self.recorder.cfg.federation.ema)  # type: ignore[arg-type]
        current = {k: v.detach().double().numpy() for k, v in codec.record_to_state(arrays).items()}
        if self.averaged is None:
            self.averaged = current
        else:
            self.averaged = {k: beta * self.averaged[k] + (1.0 - beta) * current[k] for k in current}

    def published(self, arrays: ArrayRecord) -> ArrayRecord:
        """What the run shows and saves: the moving average under federation.ema, else ``arrays``."""
        if self.recorder.cfg.federation.ema is None or self.averaged is None:
            return arrays
        dtypes = {k: t.dtype for k, t in codec.record_to_state(arrays).items()}
        return codec.state_to_record({k: torch.from_numpy(self.averaged[k]).to(dtype) for k, dtype in dtypes.items()})

    # Server optimiser state (FedAdam's moments, the moving average) so a resumed run continues it.
    _STATE = ("m_t", "v_t", "averaged")

    def strategy_state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in self._STATE:
            for key, value in (getattr(self, name, None) or {}).items():
                out[f"{name}/{key}"] = torch.from_numpy(np.array(value))
        return out

    def load_strategy_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in self._STATE:
            part = {k.split("/", 1)[1]: v.numpy() for k, v in state.items() if k.startswith(name + "/")}
            if part:
                setattr(self, name, part)


def make_strategy(cfg: Config, recorder: RunRecorder) -> Any:
    """The Recording strategy; see :func:`make_strategies` for it wrapped with client-level DP."""
    return make_strategies(cfg, recorder)[1]


def make_strategies(cfg: Config, recorder: RunRecorder) -> tuple[Any, Any]:
    """(the strategy to start, the Recording strategy inside it): the same object unless
    ``privacy.client_level`` wraps it in client-level DP at aggregation."""
    fed = cfg.federation
    client_level = cfg.privacy.client_level.enabled
    robust = fed.strategy in ROBUST
    if robust and (client_level or fed.secure_aggregation):
        raise ConfigError(robust_conflict(cfg))
    base = STRATEGIES[fed.strategy]
    cls = type(f"Recording{base.__name__}", (Recording, base), {})
    kwargs: dict[str, Any] = dict(
        fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_clients, min_evaluate_nodes=fed.min_clients, min_available_nodes=fed.min_clients,
        # The coordinator's own weight, written into each screened reply (fedslm.coordinator.metrics).
        weighted_by_key=METRIC_WEIGHT,
    )
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    if fed.strategy == "fedadam":
        kwargs["eta"] = fed.server_lr
    if fed.strategy == "trimmed_mean":
        kwargs["beta"] = fed.trim_fraction
    if fed.strategy in ("krum", "multi_krum", "bulyan"):
        kwargs["num_malicious_nodes"] = fed.byzantine
    strategy = cls(**kwargs)
    strategy.recorder = recorder
    # Client-level DP bounds each institution's influence, so the average must not weight by size;
    # robust rules count members, not claimed records.
    strategy.equal_weights = client_level or robust
    strategy.robust = robust
    if not client_level:
        return strategy, strategy
    return client_level_strategy(strategy, cfg), strategy


def robust_conflict(cfg: Config) -> str:
    """Why federation.strategy cannot be a robust rule with client-level DP or secure aggregation."""
    s = cfg.federation.strategy
    if cfg.federation.secure_aggregation:
        return (f"federation.strategy={s} needs each institution's update, but federation.secure_aggregation=true "
                "shows the coordinator only their sum; use fedavg, fedprox or fedadam with secure aggregation")
    return (f"federation.strategy={s} does not compose with privacy.client_level: its noise is calibrated to the "
            "sensitivity C/k of an unweighted mean of k clipped updates, and a robust rule's sensitivity to one "
            "institution is not C/k in general (a median or Krum's pick can move by up to 2C); use fedavg, "
            "fedprox or fedadam with client-level DP")


def label_set(cfg: Config) -> Optional[list[str]]:
    """The label set all nodes share: from config, the bundled dataset, or (simulation) the data."""
    if cfg.model.task != "classification":
        return None
    if cfg.data.labels is not None:
        return list(cfg.data.labels)
    spec = bundled.get(cfg.data.source)
    if spec is not None or Path(cfg.data.source).exists():
        return load_task_data(cfg.data, cfg.model.task).labels
    raise ConfigError("data.labels must list the label set every institution shares (the coordinator has no data)")


def run_server(grid: Any, cfg: Config, run_id: str) -> dict[str, Any]:
    """Run ``federation.rounds`` rounds on ``grid`` and write the run folder.

    A run folder holding a checkpoint of the same config is resumed after its last finished
    round, under its first run id, so nodes recognise rounds they already paid for.
    """
    out = Path(cfg.output.dir).expanduser().resolve()
    cfg.output.dir = str(out)  # absolute before it is sent: institutions' ledgers default to <output.dir>/ledgers
    out.mkdir(parents=True, exist_ok=True)
    log.warning("fedslm run folder: %s", out)
    resume = find_checkpoint(out, cfg)
    config_yaml = to_yaml(cfg)
    (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    labels = label_set(cfg)
    base = load_base(cfg.model, len(labels) if labels is not None else None)
    model = wrap(base.model, cfg.lora, cfg.model.task, base.target_modules, seed=cfg.train.seed)
    if cfg.model.head_init == "label-names":
        from fedslm.lora.prior import apply_label_prior

        apply_label_prior(model, base.tokenizer, labels or [], cfg.model)
    initial = get_adapter_state(model)
    done = 0
    if resume is not None:
        run_id, done = resume.run_id, resume.round
        set_adapter_state(model, resume.adapter)  # checks keys and shapes against this config's adapter
        initial = get_adapter_state(model)
        log.warning("fedslm: resuming run %s after round %d of %d", run_id, done, cfg.federation.rounds)
    recorder = RunRecorder(cfg, out, run_id)
    recorder.restore(done if resume is not None else -1)
    outer, strategy = make_strategies(cfg, recorder)
    strategy.offset = done
    if resume is not None:
        strategy.load_strategy_state(resume.strategy_state)

    def checkpoint(rnd: int, arrays: ArrayRecord) -> None:
        if rnd > 0 or done == 0:
            recorder.checkpoint(rnd + done, arrays, strategy.strategy_state())

    if cfg.federation.evaluate_initial and resume is None:  # round 0: every institution scores the base
        request = codec.request_config(config_yaml, base.fingerprint, run_id, frozen_digest(model))
        replies = grid.send_and_receive(strategy.configure_evaluate(0, codec.state_to_record(initial), request, grid),
                                        timeout=cfg.federation.round_timeout)
        strategy.aggregate_evaluate(0, replies)
    # A run resumed after its last round (it died before writing its summary) publishes what it would have.
    final = codec.record_to_state(strategy.published(codec.state_to_record(initial)))
    if cfg.federation.rounds > done:
        result = outer.start(
            grid=SecureAggregationGrid(grid, cfg, recorder) if cfg.federation.secure_aggregation else grid,
            initial_arrays=codec.state_to_record(initial), num_rounds=cfg.federation.rounds - done,
            timeout=cfg.federation.round_timeout,
            train_config=codec.request_config(config_yaml, base.fingerprint, run_id, frozen_digest(model)),
            evaluate_config=codec.request_config(config_yaml, base.fingerprint, run_id, frozen_digest(model)),
            evaluate_fn=checkpoint,
        )
        final = codec.record_to_state(strategy.published(result.arrays))
    set_adapter_state(model, final)
    save_adapter(model, out / "adapter", adapter_meta(cfg, base.fingerprint, labels))
    model_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
    summary = summarize(cfg, recorder.rounds, run_id, base.fingerprint, model_bytes, codec.tensor_bytes(final),
                        time.perf_counter() - recorder.started)
    if done:
        summary["resumed_after_round"] = done
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    from fedslm.lora.card import write_card

    write_card(out)  # adapter/README.md: the model card, every figure from summary.json
    from fedslm.report import write_report

    write_report(out)
    recorder.write_page()
    recorder.finish_tracking(summary)
    return summary


def summarize(cfg: Config, rounds: list[dict[str, Any]], run_id: str, fingerprint: str, model_bytes: int,
              adapter_bytes: int, wall: float) -> dict[str, Any]:
    last_eval: dict[int, dict[str, Any]] = {}
    privacy: dict[int, dict[str, Any]] = {}
    bytes_up = bytes_down = 0
    headline = "accuracy" if cfg.model.task == "classification" else "perplexity"
    initial = next((r for r in rounds if r["round"] == 0), None)
    rounds = [r for r in rounds if r["round"] > 0]
    for rec in rounds:
        for c in rec["clients"]:
            if "eval" in c:
                last_eval[c["institution"]] = c["eval"]
            if c.get("epsilon") is not None or "train_loss" in c:
                privacy[c["institution"]] = {"epsilon": c.get("epsilon"), "delta": c.get("delta"),
                                             **({"epsilon_alone": c["epsilon_alone"]} if "epsilon_alone" in c else {})}
            bytes_up += c.get("bytes_up", 0)
            bytes_down += c.get("bytes_down", 0)
    per_inst = {str(k): v.get(headline) for k, v in sorted(last_eval.items())}
    scored = {k: v for k, v in per_inst.items() if v is not None}
    worst = None
    if scored:
        pick = min if headline == "accuracy" else max
        key = pick(scored, key=scored.get)
        worst = {"institution": int(key), headline: scored[key]}
    return {
        "run_id": run_id,
        "rounds_completed": len([r for r in rounds if not r.get("stopped")]),
        "rounds_planned": cfg.federation.rounds,
        "strategy": cfg.federation.strategy,
        "institutions": cfg.federation.num_clients,
        "base_fingerprint": fingerprint,
        "final": rounds[-1]["eval_weighted"] if rounds else {},
        "per_institution": {headline: per_inst},
        **({"initial": {
            "weighted": initial["eval_weighted"],
            "per_institution": {headline: {str(c["institution"]): c["eval"].get(headline)
                                           for c in sorted(initial["clients"], key=lambda c: c["institution"])
                                           if "eval" in c}},
        }} if initial is not None else {}),
        "worst_institution": worst,
        "privacy": {
            "unit": "one record of one institution (example-level DP, per institution)",
            "per_institution": {str(k): v for k, v in sorted(privacy.items())},
            "noise_source": check_secure_mode(cfg.privacy.secure_mode) if cfg.privacy.enabled else "none (privacy disabled)",
            **({"client_level": client_level_summary(cfg, len([r for r in rounds if not r.get("stopped")]), rounds)}
               if cfg.privacy.client_level.enabled else {}),
            **({"secure_aggregation": secure_aggregation_summary(cfg, rounds)}
               if cfg.federation.secure_aggregation else {}),
        },
        "bytes": {"up_total": bytes_up, "down_total": bytes_down, "adapter": adapter_bytes, "base_model": model_bytes,
                  "adapter_over_model": adapter_bytes / model_bytes if model_bytes else None},
        "wall_seconds": wall,
    }
