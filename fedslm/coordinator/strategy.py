"""Strategy building: Flower's own strategies over adapter tensors, each wrapped by :class:`Recording`.

Strategies are Flower's (FedAvg weighted by examples, FedProx, FedAdam, and the robust FedMedian,
FedTrimmedAvg, Krum, MultiKrum, Bulyan), in the :data:`STRATEGIES` registry. :class:`Recording` is
mixed in front of one: it hands every reply to the :class:`~fedslm.coordinator.record.RunRecorder`
before Flower aggregates it, runs robust rules on updates, keeps the global adapter's dtypes, and
never lets one reply end the run (an aggregation that raises is retried without the reply it fails
on). :func:`make_strategies` wires the config in, with client-level DP wrapped around it.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum

from fedslm.config import Config
from fedslm.coordinator.bulyan import Bulyan
from fedslm.coordinator.client_level import client_level_strategy
from fedslm.coordinator.metrics import WEIGHT as METRIC_WEIGHT
from fedslm.coordinator.record import FederationStopped, RunRecorder
from fedslm.errors import ConfigError
from fedslm.registry import Registry
from fedslm.wire import codec

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


def evaluation_due(fed: Any, server_round: int) -> bool:
    """Whether the institutions score the global adapter after ``server_round`` (federation.evaluate_every,
    and always after the last round, whose scores are the run's)."""
    return server_round % fed.evaluate_every == 0 or server_round >= fed.rounds


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
        if not evaluation_due(self.recorder.cfg.federation, server_round + self.offset):
            return self.recorder.remember([])
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
            state = codec.record_to_state(arrays)
            fed = self.recorder.cfg.federation
            # federation.lora_server_lr (validated fedadam-only): Flower's FedAdam stepped from its own copy of
            # what was sent (in federation.transfer_dtype), current_arrays.
            stepped = fed.lora_server_lr is not None and lora_step(state, self.current_arrays,
                                                                    fed.lora_server_lr / fed.server_lr)
            # The global adapter keeps its dtypes: one float64 reply must not promote it for every node.
            dtypes = {k: v.dtype for k, v in self.sent.items()}
            if stepped or any(state[k].dtype != dtypes[k] for k in dtypes if k in state):
                arrays = codec.state_to_record({k: v.to(dtypes.get(k, v.dtype)) for k, v in state.items()})
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        if not evaluation_due(self.recorder.cfg.federation, server_round):
            self.recorder.without_evaluation(server_round)
            return None
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


def lora_step(state: dict[str, torch.Tensor], base: dict[str, Any], ratio: float) -> bool:
    """Rescale, in place, the LoRA tensors' FedAdam step in ``state`` (the new global adapter) from ``base``
    (what FedAdam stepped from) by ``ratio`` = lora_server_lr / server_lr: Adam's step is η times a
    per-coordinate direction, so this is Adam at lora_server_lr (Flower's moments are kept from the averaged
    updates around the adapter sent, whatever η moved it). Returns whether any tensor was rescaled."""
    stepped = False
    for k, new in state.items():
        if "lora_" in k and k in base:
            old = torch.from_numpy(np.asarray(base[k])).to(new.dtype)
            state[k] = old + (new - old) * ratio
            stepped = True
    return stepped


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

