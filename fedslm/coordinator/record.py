"""The run recorder: what the coordinator makes of each round's replies, and the run folder it writes.

:class:`RunRecorder` trusts no reply: it screens every update (:mod:`fedslm.coordinator.screen`) and
every reply's metrics (:mod:`fedslm.coordinator.metrics`), decides each reply's weight and identity
itself, drops a failed or malformed reply (logged with its node and reason) and never the run, stops
the run when fewer than ``federation.min_clients`` replies remain, and writes ``metrics.jsonl`` (one
object per round), the checkpoint (:mod:`fedslm.coordinator.resume`), ``report.html`` (rewritten every
round) and the experiment trackers' records (:mod:`fedslm.coordinator.tracking`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from flwr.app import ArrayRecord, Message

from fedslm.config import Config
from fedslm.coordinator.metrics import Labels, canonical, screen as screen_metrics, weights as coordinator_weights
from fedslm.coordinator.resume import atomic_write, write_checkpoint
from fedslm.coordinator.screen import check_update, default_max_update_norm
from fedslm.errors import FedslmError
from fedslm.wire import codec

log = logging.getLogger("fedslm.server")


class FederationStopped(FedslmError):
    """Too few institutions replied for the round to count."""


def _finite(value: Any) -> Any:
    """None for what cannot be shown: inf, NaN, or a value a deployed node withheld (codec.WITHHELD)."""
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == codec.WITHHELD:
        return None
    return value


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

    def without_evaluation(self, server_round: int) -> None:
        """A round the institutions did not score (federation.evaluate_every): its line, with no eval."""
        self._round(server_round)
        self._flush(server_round)

    def checkpoint(self, server_round: int, arrays: ArrayRecord,
                   strategy_state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The global adapter and server state after ``server_round`` (0: the initial adapter).

        Written after the round's line in ``metrics.jsonl``, so a checkpoint never runs ahead of it.
        """
        write_checkpoint(self.out, self.cfg, self.run_id, server_round, codec.record_to_state(arrays), strategy_state)

    def restore(self, done: int) -> None:
        """Continue a run folder whose rounds 1..``done`` are checkpointed: keep their metrics lines only."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [rec for rec in (json.loads(line) for line in lines if line.strip()) if rec["round"] <= done]
        atomic_write(path, "".join(json.dumps(rec) + "\n" for rec in kept).encode())
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
