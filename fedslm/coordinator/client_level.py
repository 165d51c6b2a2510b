"""Client-level DP at aggregation, with Flower's own DP strategy wrappers, and its accounting.

Each institution's update (its adapter minus the global one) is clipped to an L2 bound C, the
inner strategy averages them unweighted (fedslm switches FedAvg to a unit weight per institution:
weighting by size would let a large institution move the average by more than C), and Gaussian
noise of std ``z · C / k`` is added for the k institutions whose updates were averaged. Four variants, each a subclass of
Flower's wrapper of the same name:

* server-side fixed clipping (``DifferentialPrivacyServerSideFixedClipping``): the coordinator clips;
* client-side fixed clipping (``DifferentialPrivacyClientSideFixedClipping``): each node clips before
  it sends (:func:`clip_update`), and the coordinator rejects an update over the bound instead of
  trusting it; the only variant that works with secure aggregation, where the coordinator never
  sees a single update;
* adaptive clipping, server- or client-side (``DifferentialPrivacy*AdaptiveClipping``, Andrew et
  al. 2021): C follows a target quantile of the update norms, from a noised count of clipped updates.

fedslm changes four things in Flower's wrappers:

* updates are screened (NaN, shapes, keys, norm bound, size; failed replies logged) *before* they
  are clipped, so a malformed update is rejected with its reason instead of crashing the clipping
  arithmetic (and an update of norm 0 is kept, not divided by zero);
* updates are paired with the global adapter by key, not by position;
* adaptive clipping noises a round's average with the bound that round was clipped to. Flower 1.42
  moves the bound first and then noises with the new one, so a falling bound under-noises the round;
* noise (on the updates, and on the clipped count) comes from the OS CSPRNG
  (:mod:`fedslm.privacy.csprng`), not numpy's global generator.

Accounting: each round is one Gaussian mechanism with noise multiplier z on the institution-level
sensitivity; composed over the rounds with Opacus' RDP accountant, with no sampling amplification
assumed (every round's institutions count as chosen, which is exact for fraction_train = 1 and
conservative otherwise). With adaptive clipping, the updates get z_Δ = (z⁻² − (2σ_b)⁻²)^-½ and the
count gets σ_b, which together cost exactly what one Gaussian mechanism with z costs (Andrew et al.,
Thm. 1), so the same accounting holds. The unit is one institution's whole data set.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedslm.config import Config
from fedslm.coordinator.metrics import screened
from fedslm.privacy.clipping import clip_update
from fedslm.wire.secagg import CLIPPED_COUNT
from fedslm.privacy import csprng
from fedslm.privacy.accountant import epsilon

# A node's clipped update may exceed the bound by float rounding only.
_ROUNDING = 1e-4


def sampled_per_round(cfg: Config) -> int:
    fed = cfg.federation
    return max(fed.min_clients, int(fed.num_clients * fed.fraction_train))


# δ of the client-level guarantee unless set: far below 1/institutions for any federation (1/(10·N)
# would be 0.02 at 5 institutions: a 2% chance that the guarantee fails outright).
DEFAULT_CLIENT_DELTA = 1e-5


def client_level_delta(cfg: Config) -> float:
    cl = cfg.privacy.client_level
    return cl.delta if cl.delta is not None else min(DEFAULT_CLIENT_DELTA, 1.0 / (10 * cfg.federation.num_clients))


def clipped_count_stddev(cfg: Config) -> float:
    cl = cfg.privacy.client_level
    if cl.clipped_count_stddev is not None:
        return cl.clipped_count_stddev
    return max(sampled_per_round(cfg) / 20, 1.2 * cl.noise_multiplier)


def _noised(arrays: ArrayRecord, std: float) -> ArrayRecord:
    out = {}
    for key, array in arrays.items():
        values = array.numpy()
        noise = csprng.standard_normal(values.size).reshape(values.shape) * std
        out[key] = Array(np.asarray(values + noise.astype(values.dtype)))
    return ArrayRecord(out)


class _Fedslm:
    """Shared by the four wrappers: screening first, CSPRNG noise, per-round bookkeeping."""

    strategy: Any
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int
    client_side: bool = False
    adaptive: bool = False
    current_arrays: ArrayRecord
    _round_norm: Optional[float] = None  # set when the round is configured
    # Under secure aggregation: the quantisation step, which the unmasked average may be off by per coordinate.
    secagg_step: float = 0.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any):
        self.current_arrays = arrays
        self._round_norm = self.clipping_norm  # the bound this round is clipped to, and noised for
        if self.client_side:
            config[KEY_CLIPPING_NORM] = self.clipping_norm
            # The coordinator holds nodes to the bound they were sent. Under secure aggregation it sees
            # only the average, whose norm the same bound limits, up to the quantisation error.
            slack = math.sqrt(sum(a.numpy().size for a in arrays.values())) * self.secagg_step if self.secagg_step else 0.0
            self.strategy.update_norm_limit = self.clipping_norm * (1 + _ROUNDING) + slack
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def _screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        inner = self.strategy
        return inner.screen(server_round + inner.offset, replies)

    def _clip_on_server(self, replies: list[Message]) -> int:
        current = {k: a.numpy() for k, a in self.current_arrays.items()}
        clipped = 0
        for reply in replies:
            for name, record in reply.content.array_records.items():
                values, _, was = clip_update(current, {k: a.numpy() for k, a in record.items()}, self._round_norm)
                clipped += int(was)
                reply.content[name] = ArrayRecord({k: Array(v) for k, v in values.items()})
        return clipped

    def _note(self, server_round: int, **values: Any) -> None:
        inner = self.strategy
        inner.recorder.note(server_round + inner.offset, "client_level", values)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        if self._round_norm is None:
            self._round_norm = self.clipping_norm
        valid = self._screen(server_round, replies)
        if self.client_side:
            counts = {screened(r).get(CLIPPED_COUNT) for r in valid} - {None}
            if counts:  # under SecAgg+ the bits were summed inside the masked sum: only the count is known
                clipped = int(counts.pop())
            else:
                bits = [int(screened(r).get(KEY_NORM_BIT, 0) == 1) for r in valid] if self.adaptive else []
                clipped = sum(bits)
        else:
            clipped = self._clip_on_server(valid)
        arrays, metrics = self.strategy.aggregate_train(server_round, valid)
        # The release is the unweighted mean of the k updates that arrived, whose sensitivity to one
        # institution is C/k: the noise must be z·C/k. (z·C/m with the planned m under-noises every
        # round that lost replies to dropouts or rejections.)
        k = max(len(valid), 1)
        std = self.noise_multiplier * self._round_norm / k
        if arrays is not None:
            arrays = _noised(arrays, std)
        note: dict[str, Any] = {"clipping_norm": self._round_norm, "noise_std": std, "institutions_averaged": k}
        if not self.client_side or self.adaptive:
            note["clipped"] = clipped
        if self.adaptive and valid:
            # Andrew et al.: move C by a noised fraction of clipped updates, after this round's noise.
            noisy = (clipped + float(csprng.standard_normal(1)[0]) * self.clipped_count_stddev) / len(valid)
            self._geometric_update(noisy)
            note.update(clipped_fraction_noised=noisy, next_clipping_norm=self.clipping_norm)
        self._note(server_round, **note)
        self._round_norm = None
        return arrays, metrics


class ServerFixed(_Fedslm, DifferentialPrivacyServerSideFixedClipping):
    pass


class ClientFixed(_Fedslm, DifferentialPrivacyClientSideFixedClipping):
    client_side = True


class ServerAdaptive(_Fedslm, DifferentialPrivacyServerSideAdaptiveClipping):
    adaptive = True


class ClientAdaptive(_Fedslm, DifferentialPrivacyClientSideAdaptiveClipping):
    client_side = True
    adaptive = True


def client_level_strategy(inner: Any, cfg: Config) -> Any:
    """``inner`` (a Recording strategy) wrapped in the client-level DP variant ``cfg`` asks for."""
    cl = cfg.privacy.client_level
    m = sampled_per_round(cfg)
    strategy: _Fedslm
    if cl.adaptive:
        cls = ClientAdaptive if cl.clipping == "client" else ServerAdaptive
        strategy = cls(inner, noise_multiplier=cl.noise_multiplier, num_sampled_clients=m,
                       initial_clipping_norm=cl.clipping_norm, target_clipped_quantile=cl.target_quantile,
                       clip_norm_lr=cl.clip_norm_lr, clipped_count_stddev=clipped_count_stddev(cfg))
    else:
        cls = ClientFixed if cl.clipping == "client" else ServerFixed
        strategy = cls(inner, noise_multiplier=cl.noise_multiplier, clipping_norm=cl.clipping_norm,
                       num_sampled_clients=m)
    if cfg.federation.secure_aggregation:
        from fedslm.wire.secagg import quantization_step

        strategy.secagg_step = quantization_step(cfg)
    return strategy


def client_level_summary(cfg: Config, releases: int, rounds: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    cl = cfg.privacy.client_level
    delta = client_level_delta(cfg)
    norms = [r["client_level"]["clipping_norm"] for r in rounds or [] if "client_level" in r]
    out = {
        "unit": "one institution's entire data (client-level DP, for the federation's released adapters)",
        "epsilon": epsilon([(cl.noise_multiplier, 1.0, releases)], delta) if releases else 0.0,
        "delta": delta,
        "rounds": releases,
        "noise_multiplier": cl.noise_multiplier,
        "clipping": cl.clipping,
        "adaptive": cl.adaptive,
        "clipping_norm": cl.clipping_norm,
        "institutions_per_round": sampled_per_round(cfg),
        "accountant": "rdp (Opacus), Gaussian mechanism per round, no sampling amplification assumed",
        "noise_source": csprng.SOURCE,
        "trust": "the coordinator adds this noise: it protects institutions from whoever receives the adapter, "
                 "not from the coordinator itself",
        "meaning": f"with {cfg.federation.num_clients} institutions, ε bounds how much any one institution's "
                   "participation (all of its records at once) can change the released adapters; with so few "
                   "institutions a small ε needs so much noise that the model learns little, and a large ε "
                   "still lets a reader tell whether one named institution took part",
    }
    if cl.adaptive:
        out["clipping_norms"] = norms
        out["clipped_count_stddev"] = clipped_count_stddev(cfg)
    return out
