"""What a deployed node says about itself besides the adapter: DP releases or public facts only.

**Evaluation** scores the global adapter on the node's held-out records, which are a privacy unit of
their own (disjoint from the training records, so their budget composes separately; the policy's
``evaluation`` section). Each evaluation releases, with Gaussian noise, the number of records, how many
were classified right and (if the policy releases ``loss``) the sum of per-record losses clipped to
``loss_cap``. One record changes each of these by at most 1, 1 and ``loss_cap``, so the vector
(records, correct, loss_sum / loss_cap) has L2 sensitivity √k for k released sums, and noise of std
z on each normalised coordinate is a Gaussian mechanism with noise multiplier z / √k, calibrated so
that one evaluation costs ``epsilon_per_evaluation`` at the policy's δ and charged to the held-out
unit's ledger before the model is scored. Accuracy and mean loss are post-processing of the noised
sums. Macro-F1, which needs per-class counts, is withheld.

**Training** replies carry only public facts (steps, bytes, the node's δ, whether it was private or a
replay) and the adapter. The training loss, empty steps, seconds, the update norm and how many
coordinates SecAgg+'s range clipped depend on the records or on the secret sampling and are withheld
(sent as ``WITHHELD``, so that every reply has the same metric keys, which Flower's FedAvg needs).
The record count, the sample rate, σ and the ε spent reveal the dataset's size and are sent only if
the policy says the size is public; otherwise the count is 1 (each institution then weighs the same in
FedAvg) and the rest is withheld. The node's own ledger always shows its ε (``fedslm ledger show``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier

from fedslm.privacy import csprng
from fedslm.wire.codec import WITHHELD
# Training metrics that depend on the records or on the secret Poisson sampling.
PRIVATE_TRAIN_METRICS = ("train-loss", "empty-steps", "train-seconds", "seconds", "update-norm", "secagg-clipped")
# Training metrics that reveal the number of training records: q = batch / n, the σ calibrated to q,
# and the ε spent, a function of (σ, q, steps): with a σ the request fixed, or after any round but the
# last of a calibrated plan, it gives q and so n away.
SIZE_TRAIN_METRICS = ("sample-rate", "noise-multiplier", "epsilon", "epsilon-alone")


def public_train_metrics(metrics: Mapping[str, Any], *, size_is_public: bool) -> dict[str, Any]:
    out = dict(metrics)
    for key in PRIVATE_TRAIN_METRICS:
        if key in out:
            out[key] = WITHHELD
    if not size_is_public:
        for key in SIZE_TRAIN_METRICS:
            if key in out:
                out[key] = WITHHELD
        out["num-examples"] = 1
    return out


@dataclass(frozen=True)
class EvaluationRelease:
    noise_multiplier: float  # the mechanism's, relative to its L2 sensitivity
    noise_std: float  # on each normalised sum
    sums: int


def calibrate(epsilon: float, delta: float, sums: int) -> EvaluationRelease:
    """Noise for one evaluation that costs ``epsilon`` at ``delta`` (one Gaussian mechanism, RDP)."""
    with warnings.catch_warnings():
        # Opacus' search starts at a σ whose optimal RDP order is off its grid; the σ it returns is not.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=1,
                                           accountant="rdp", epsilon_tolerance=epsilon / 100))
    return EvaluationRelease(noise_multiplier=sigma, noise_std=sigma * math.sqrt(sums), sums=sums)


def release_evaluation(counts: Mapping[str, float], release: EvaluationRelease, *, loss_cap: float,
                       with_loss: bool, task: str) -> dict[str, Any]:
    """The noised metrics of one evaluation, with the same OS-CSPRNG noise as DP-SGD's secure mode
    (each value the sum of four normals halved, against floating-point attacks on the Gaussian)."""
    noise = csprng.gaussian_like(torch.zeros(release.sums, dtype=torch.float64), release.noise_std).numpy()
    records = float(counts["records"]) + float(noise[0])
    shown = max(records, 1.0)
    out: dict[str, Any] = {"num-examples": int(max(1, round(records)))}
    i = 1
    if task == "classification":
        out["accuracy"] = float(np.clip((float(counts["correct"]) + float(noise[i])) / shown, 0.0, 1.0))
        out["macro-f1"] = WITHHELD
        i += 1
    if with_loss:
        loss = max(0.0, (float(counts["loss_sum"]) + float(noise[i]) * loss_cap) / shown)
        out["loss"] = loss
        if task != "classification":
            out["perplexity"] = math.exp(min(loss, 50.0))
    else:
        out["loss"] = WITHHELD
        if task != "classification":
            out["perplexity"] = WITHHELD
    return out
