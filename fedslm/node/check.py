"""``fedslm node check``: a node policy validated, its data read, its budget and split shown."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedslm.config.schema import DataConfig
from fedslm.data import bundled, load_task_data
from fedslm.data.readers import header_columns
from fedslm.node.policy import PolicyError, default_floor, load_policy, proposed_floor
from fedslm.privacy import Ledger
from fedslm.privacy.ledger import LedgerError


def file_task(data: DataConfig, *, labels_set: bool) -> str:
    """The task a node's file is for: classification when the policy lists a label set or the file has
    the label column, else causal LM. The file is read (and validated) to see its columns."""
    spec = bundled.get(data.source)
    if spec is not None:
        return spec.task
    if labels_set:
        return "classification"
    path = Path(data.source).expanduser()
    if not path.exists():
        return "classification"  # load_task_data names the missing file
    return "classification" if data.label_column in header_columns(path) else "causal_lm"


def check_policy(path: str | Path) -> dict[str, Any]:
    policy = load_policy(path)
    d, p = policy.data, policy.privacy
    data_cfg = d.data_config()
    # The file's errors are reported for the task it is meant for, never hidden by falling back to the
    # other one (a classification file with an empty label is still a valid plain-text file).
    data = load_task_data(data_cfg, file_task(data_cfg, labels_set=d.labels is not None))
    n = len(data.train)
    warnings = []
    if not p.max_delta < 1.0 / n:  # type: ignore[operator]
        raise PolicyError(f"node policy {path}: privacy.max_delta={p.max_delta:g} is not below 1/n = {1.0 / n:.3g} "
                          f"for {n} training records; choose at most {1.0 / (10 * n):.3g}")
    if not d.size_is_public and d.size_floor is None:
        warnings.append("data.size_is_public=false but data.size_floor is not set: the DP noise is planned for "
                        f"{default_floor(n)} records (the largest power of two at or below your count), so your "
                        "updates tell ⌊log2 n⌋; a public lower bound of your own costs less utility (e.g. "
                        f"data.size_floor: {proposed_floor(n)})")
    if d.size_floor is not None and d.size_floor > n:
        raise PolicyError(f"node policy {path}: data.size_floor={d.size_floor} is above the {n} training records; "
                          "it must be a lower bound")
    if len(data.test) < d.min_test_records:
        warnings.append(f"{len(data.test)} held-out records, fewer than data.min_test_records={d.min_test_records}: "
                        "this node will refuse to evaluate")
    try:
        spent = Ledger(str(p.ledger)).spent(p.unit, float(p.max_delta), p.accountant)  # type: ignore[arg-type]
    except LedgerError as exc:
        raise PolicyError(f"node policy {path}: {exc}") from None
    if spent >= float(p.max_epsilon):  # type: ignore[arg-type]
        warnings.append(f"the budget of unit {p.unit!r} is spent (ε={spent:.3f}): every training round will be refused")
    from fedslm.models import presets

    for name in policy.models.allowed:
        if presets.get(name) is None and not Path(name).expanduser().is_dir():
            warnings.append(f"models.allowed lists {name!r}, which is neither a bundled preset "
                            f"({', '.join(presets.names())}) nor a model folder on this machine")
    if not p.require_secure_noise:
        warnings.append("privacy.require_secure_noise=false: DP noise may come from torch's generator, whose 32-bit "
                        "seed a coordinator could search to subtract the noise; set it to true")
    if data.labels is not None and d.labels is None:
        warnings.append("data.labels is not set: this node refuses classification rounds until it lists the label set")
    from fedslm.node.metrics import calibrate

    ev = policy.evaluation
    m = len(data.test)
    sums = 1 + int("accuracy" in ev.release and data.labels is not None) + int("loss" in ev.release)
    release = calibrate(ev.epsilon_per_evaluation, float(p.max_delta), sums)  # type: ignore[arg-type]
    held_out_spent = Ledger(str(p.ledger)).spent(ev.unit, float(p.max_delta))  # type: ignore[arg-type]
    if not float(p.max_delta) < 1.0 / max(m, 1):  # type: ignore[arg-type]
        warnings.append(f"privacy.max_delta is not below 1/m for the {m} held-out records: this node will refuse "
                        "to evaluate")
    from fedslm.wire import identity

    sa = policy.secure_aggregation
    if p.require_secure_aggregation and not sa.peers:
        warnings.append("privacy.require_secure_aggregation=true but secure_aggregation.peers lists no institution: "
                        "a coordinator could fill this node's cohort with neighbours it made up and unmask its update "
                        "(fedslm node keygen, then list the others' keys)")
    from fedslm.train.device import DeviceError, resolve_device, torch_sees

    try:  # what this node would train on; a device the machine lacks is refused like any policy error
        device = str(resolve_device(policy.resources.device))
    except DeviceError as exc:
        raise PolicyError(f"node policy {path}: {exc}") from None
    mine = identity.fingerprint(identity.raw_public(identity.load_private(sa.identity_key).public_key())) \
        if sa.identity_key else None
    return {
        "secure_aggregation": {"min_cohort": sa.min_cohort, "min_threshold": sa.min_threshold, "identity": mine,
                               "peers": {k: identity.fingerprint(identity.load_public(v)) for k, v in sa.peers.items()},
                               "max_unverified_share": sa.max_unverified_share},
        "evaluation": {"unit": ev.unit, "max_epsilon": ev.max_epsilon, "epsilon_per_evaluation": ev.epsilon_per_evaluation,
                       "spent_epsilon": held_out_spent, "release": list(ev.release),
                       "noise_std_per_sum": release.noise_std,
                       "accuracy_noise_points": 100 * release.noise_std / max(m, 1)},
        "name": policy.name,
        "data": {"source": d.source, "train_records": n, "test_records": len(data.test), "split_seed": d.split_seed,
                 "test_fraction": d.test_fraction, "labels": data.labels},
        "privacy": {"unit": p.unit, "ledger": str(p.ledger), "max_epsilon": p.max_epsilon, "max_delta": p.max_delta,
                    "one_over_n": 1.0 / n, "accountant": p.accountant,
                    "spent_epsilon": None if math.isinf(spent) else spent,
                    "allow_non_private": p.allow_non_private, "require_secure_noise": p.require_secure_noise,
                    "require_secure_aggregation": p.require_secure_aggregation},
        "models": {"allowed": list(policy.models.allowed), "fingerprints": policy.models.fingerprints},
        "resources": {"max_physical_batch_size": policy.resources.max_physical_batch_size,
                      "max_feature_batch_size": policy.resources.max_feature_batch_size,
                      "max_eval_batch_size": policy.resources.max_eval_batch_size,
                      "max_length": policy.resources.max_length,
                      "device": policy.resources.device, "resolved_device": device, "torch_sees": torch_sees()},
        "warnings": warnings,
    }
