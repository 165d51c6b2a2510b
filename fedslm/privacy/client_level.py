"""Client-level DP at aggregation, with Flower's own wrapper, and its accounting.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips each institution's update to
``clipping_norm`` (L2 distance from the global adapter), lets the inner strategy average them
(unweighted: fedslm switches FedAvg to a unit weight per institution, since weighting by size
would let a large institution move the average by more than the clipping bound), and adds
Gaussian noise of std ``z · C / m`` for m institutions per round. fedslm adds two things:

* updates are screened (NaN, shapes, keys, norm bound, size; failed replies logged) *before*
  they are clipped, so a malformed update is rejected with its reason instead of crashing the
  clipping arithmetic (and an update of norm 0 is kept, not divided by zero);
* the noise comes from the OS CSPRNG (:mod:`fedslm.privacy.csprng`) instead of numpy's global
  generator.

Accounting: each round is one Gaussian mechanism with noise multiplier z on the institution-level
sensitivity; composed over the rounds with Opacus' RDP accountant, with no sampling amplification
assumed (every round's institutions count as chosen, which is exact for fraction_train = 1 and
conservative otherwise). The unit is one institution's whole data set.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedslm.config import Config
from fedslm.privacy import csprng
from fedslm.privacy.accountant import epsilon


def sampled_per_round(cfg: Config) -> int:
    fed = cfg.federation
    return max(fed.min_clients, int(fed.num_clients * fed.fraction_train))


def client_level_delta(cfg: Config) -> float:
    cl = cfg.privacy.client_level
    return cl.delta if cl.delta is not None else 1.0 / (10 * cfg.federation.num_clients)


class ClientLevelDP(DifferentialPrivacyServerSideFixedClipping):
    @classmethod
    def around(cls, inner: Any, cfg: Config) -> "ClientLevelDP":
        cl = cfg.privacy.client_level
        return cls(inner, noise_multiplier=cl.noise_multiplier, clipping_norm=cl.clipping_norm,
                   num_sampled_clients=sampled_per_round(cfg))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Screen, clip each update (FlatClip, as Flower's wrapper does; an update of norm 0 stays as it
        is, where Flower's helper would divide by zero), average in the inner strategy, add noise."""
        inner = self.strategy
        valid = inner.screen(server_round + inner.offset, replies)
        # By key, not by position: screening checked the key set and shapes, not the order a node sent.
        current = {k: a.numpy() for k, a in self.current_arrays.items()}
        for reply in valid:
            for name, record in reply.content.array_records.items():
                values = {k: a.numpy() for k, a in record.items()}
                update = {k: v - current[k] for k, v in values.items()}
                norm = float(np.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in update.values())))
                scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
                reply.content[name] = ArrayRecord({k: Array(np.asarray(current[k] + update[k] * scale,
                                                                       dtype=values[k].dtype))
                                                   for k in current})
        arrays, metrics = inner.aggregate_train(server_round, valid)
        if arrays is not None:
            arrays = self._add_noise_to_aggregated_arrays(arrays)
        return arrays, metrics

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = self.noise_multiplier * self.clipping_norm / self.num_sampled_clients
        noised = {}
        for key, array in aggregated_arrays.items():
            values = array.numpy()
            noise = csprng.standard_normal(values.size).reshape(values.shape) * std
            noised[key] = Array(np.asarray(values + noise.astype(values.dtype)))
        return ArrayRecord(noised)


def client_level_summary(cfg: Config, releases: int) -> dict[str, Any]:
    cl = cfg.privacy.client_level
    delta = client_level_delta(cfg)
    return {
        "unit": "one institution's entire data (client-level DP, for the federation's released adapters)",
        "epsilon": epsilon([(cl.noise_multiplier, 1.0, releases)], delta) if releases else 0.0,
        "delta": delta,
        "rounds": releases,
        "noise_multiplier": cl.noise_multiplier,
        "clipping_norm": cl.clipping_norm,
        "institutions_per_round": sampled_per_round(cfg),
        "accountant": "rdp (Opacus), Gaussian mechanism per round, no sampling amplification assumed",
        "noise_source": csprng.SOURCE,
        "trust": "the coordinator adds this noise: it protects institutions from whoever receives the adapter, "
                 "not from the coordinator itself",
    }
