"""Load a :class:`Config` from YAML files plus ``key=value`` overrides, and validate it.

Every failure is a :class:`ConfigError` whose one-line message names the key,
the value and what is allowed, e.g.
``privacy.target_epsilon must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from fedslm.config.schema import ACCOUNTANTS, OPTIMIZERS, PARTITIONERS, POOLINGS, STRATEGIES, TASKS, WEIGHTINGS, Config
from fedslm.config.yamlfile import DuplicateKeyError, load_yaml
from fedslm.errors import ConfigError


def _fields(cls_or_obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls_or_obj)]


def _section_type(key: str) -> Any:
    """The dataclass that owns the parent of a dotted key, for error hints."""
    obj: Any = Config
    for part in key.split(".")[:-1]:
        names = {f.name: f for f in dataclasses.fields(obj)}
        if part not in names:
            return None
        obj = names[part].default_factory  # type: ignore[assignment]
        if obj is dataclasses.MISSING or not dataclasses.is_dataclass(obj):
            return None
    return obj


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    where = f" (in {source})" if source else ""
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        owner = _section_type(key)
        allowed = ", ".join(_fields(owner)) if owner else ", ".join(_fields(Config))
        return ConfigError(f"unknown key '{key}'{where}; allowed here: {allowed}")
    value = getattr(exc, "value", None)
    first_line = str(getattr(exc, "msg", exc)).splitlines()[0]
    if value is not None:
        return ConfigError(f"{key}: bad value {value!r}{where}: {first_line}")
    return ConfigError(f"{key}: {first_line}{where}")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. privacy.target_epsilon=3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except DuplicateKeyError as exc:
        raise ConfigError(f"override {key}: {exc}") from None
    except yaml.YAMLError:
        value = raw
    return key, value


def _read_yaml(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None


def load_config(
    files: Sequence[str | Path] = (),
    overrides: Iterable[str] = (),
    texts: Sequence[str] = (),
) -> Config:
    """Merge ``files`` (in order), then YAML ``texts``, then ``overrides`` onto the defaults; validate."""
    merged = OmegaConf.structured(Config)
    sources = [(str(Path(p)), _read_yaml(Path(p))) for p in files] + [("config text", t) for t in texts]
    for source, text in sources:
        try:
            content = load_yaml(text)
        except DuplicateKeyError as exc:
            raise ConfigError(f"config file {source}: {exc}") from None
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"config file {source} is not valid YAML: {first}") from None
        if content is None:
            continue
        if not isinstance(content, dict):
            raise ConfigError(f"config file {source} must hold a mapping of sections, got {type(content).__name__}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(content))
        except OmegaConfBaseException as exc:
            raise _explain(exc, source) from None
    for item in overrides:
        key, value = _parse_override(item)
        if "." not in key:
            raise ConfigError(
                f"override key '{key}' must name a section and a key (section.key); "
                f"sections: {', '.join(_fields(Config))}"
            )
        try:
            OmegaConf.update(merged, key, value, merge=True, force_add=False)
        except OmegaConfBaseException as exc:
            raise _explain(exc, "command line") from None
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _explain(exc, "") from None
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(key: str, value: float | int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _check(value is not None and value > 0 and not (isinstance(value, float) and math.isnan(value)),
           f"{key} must be > 0, got {value}")


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    _check(value in allowed, f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _finite_floats(obj: Any, prefix: str = "") -> None:
    """Every float in the config is finite: ``.inf`` or ``.nan`` would make the noise plan loop forever
    or release NaN (and a node takes its config from an untrusted request)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _finite_floats(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")


def _lp_ft(cfg: Config) -> None:
    """lora.from_round, lora.train_head and federation.lora_server_lr (fedslm.train.lpft)."""
    lo, fed = cfg.lora, cfg.federation
    if lo.from_round is not None:
        _check(type(lo.from_round) is int and lo.from_round >= 2, "lora.from_round must be a round number, 2 or "
               f"more (rounds before it train the head alone), got {lo.from_round!r}")
        _check(cfg.model.task == "classification" and isinstance(lo.layers, int) and lo.layers >= 1,
               "lora.from_round (LP-FT: the head alone on cached sentence vectors, then LoRA) needs model.task "
               f"'classification' and lora.layers >= 1, got {cfg.model.task!r} and lora.layers={lo.layers!r}")
        _check(lo.from_round <= fed.rounds,
               f"lora.from_round={lo.from_round} is past federation.rounds={fed.rounds}: LoRA would never train")
        _check(fed.strategy != "fedprox", "lora.from_round does not compose with federation.strategy 'fedprox': a "
               "probe round trains the head alone, without the proximal term's pull on LoRA")
        # A probe round's LoRA must come back exactly as sent (B = 0): noise added at aggregation (client-level
        # DP) or SecAgg+'s quantisation would move it, and every node would refuse the next probe round.
        _check(not cfg.privacy.client_level.enabled and not fed.secure_aggregation,
               "lora.from_round does not compose with privacy.client_level or federation.secure_aggregation: their "
               "noise or quantisation moves LoRA's B off 0 in the probe rounds, which the nodes then refuse")
    _check(lo.train_head or lo.from_round is not None, "lora.train_head: false keeps the head the probe rounds "
           "trained: it needs lora.from_round (without probe rounds the head would stay at its start all run)")
    _check(fed.lora_server_lr is None or lo.layers != 0,
           "federation.lora_server_lr steps LoRA tensors, and lora.layers=0 trains none")


def validate(cfg: Config) -> None:
    """Reject values no run could use, naming the key. Raises ConfigError."""
    _finite_floats(cfg)
    _check(bool(cfg.model.name.strip()), "model.name must name a bundled preset or a local model directory, got ''")
    _choice("model.task", cfg.model.task, TASKS)
    _positive("model.max_length", cfg.model.max_length)
    _check(cfg.model.max_length >= 4, f"model.max_length must be >= 4, got {cfg.model.max_length}")
    _choice("model.pooling", cfg.model.pooling, POOLINGS)
    _choice("model.feature_precision", cfg.model.feature_precision, ("auto", "fp32"))
    _check(cfg.model.pooling == "cls" or cfg.model.task == "classification",
           f"model.pooling '{cfg.model.pooling}' applies to model.task 'classification' only")

    _check(not cfg.model.normalize or cfg.model.pooling == "mean",
           "model.normalize applies to model.pooling 'mean' only")
    _choice("model.head_init", cfg.model.head_init, ("random", "label-names"))
    _check(cfg.model.head_init == "random" or cfg.model.task == "classification",
           "model.head_init 'label-names' applies to model.task 'classification' only")
    _positive("model.head_prior_scale", cfg.model.head_prior_scale)
    if cfg.model.classifier_dropout is not None:
        _check(0.0 <= cfg.model.classifier_dropout < 1.0,
               f"model.classifier_dropout must be in [0, 1), got {cfg.model.classifier_dropout}")
        _check(cfg.model.task == "classification", "model.classifier_dropout applies to model.task 'classification' only")
    if cfg.lora.layers is not None:
        _check(isinstance(cfg.lora.layers, int) and not isinstance(cfg.lora.layers, bool) and cfg.lora.layers >= 0,
               f"lora.layers must be a whole number of top encoder layers, 0 or more (0: the head alone), got "
               f"{cfg.lora.layers!r}")
        _check(cfg.model.task == "classification" or cfg.lora.layers >= 1, "lora.layers must be >= 1 for model.task "
               f"'causal_lm' (the top decoder layers that carry LoRA; the output layer stays frozen), got {cfg.lora.layers}")
    _check(0.0 <= cfg.train.momentum < 1.0, f"train.momentum must be in [0, 1), got {cfg.train.momentum}")
    _check(cfg.lora.head_bias or cfg.model.task == "classification",
           "lora.head_bias: false applies to model.task 'classification' only")
    _positive("lora.r", cfg.lora.r)
    _positive("lora.alpha", cfg.lora.alpha)
    _check(cfg.lora.alpha / max(cfg.lora.r, 1) <= 256, f"lora.alpha / lora.r must be <= 256 (LoRA's scale), got "
           f"{cfg.lora.alpha / max(cfg.lora.r, 1):g}")
    _check(0.0 <= cfg.lora.dropout < 1.0, f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    _lp_ft(cfg)
    if cfg.lora.target_modules is not None:
        _check(len(cfg.lora.target_modules) > 0 and all(m.strip() for m in cfg.lora.target_modules),
               f"lora.target_modules must be a non-empty list of module names, got {cfg.lora.target_modules}")

    _check(bool(cfg.data.source.strip()), "data.source must be a bundled dataset name or a .csv/.jsonl path, got ''")
    _check(0.0 < cfg.data.test_fraction < 1.0,
           f"data.test_fraction must be in (0, 1), got {cfg.data.test_fraction}")
    if cfg.data.labels is not None:
        _check(len(cfg.data.labels) >= 2, f"data.labels must list at least 2 labels, got {cfg.data.labels}")
        _check(len(set(cfg.data.labels)) == len(cfg.data.labels),
               f"data.labels must not repeat a label, got {cfg.data.labels}")
    _positive("data.max_train_records", cfg.data.max_train_records, allow_none=True)
    _positive("data.max_test_records", cfg.data.max_test_records, allow_none=True)

    p = cfg.privacy
    _positive("privacy.target_epsilon", p.target_epsilon)
    if p.delta is not None:
        _check(0.0 < p.delta < 1.0, f"privacy.delta must be in (0, 1), got {p.delta}")
    _positive("privacy.max_grad_norm", p.max_grad_norm)
    _positive("privacy.max_epsilon", p.max_epsilon, allow_none=True)
    _choice("privacy.accountant", p.accountant, ACCOUNTANTS)
    _choice("privacy.clipping_mode", p.clipping_mode, ("hooks", "ghost"))
    if p.noise_multiplier is not None:
        _check(p.noise_multiplier >= 0, f"privacy.noise_multiplier must be >= 0, got {p.noise_multiplier}")
    if p.ledger is not None:
        _check(bool(p.ledger.strip()), "privacy.ledger must be a file path or null, got ''")
    _check(bool(p.unit.strip()), "privacy.unit must name the privacy unit the ledger charges, got ''")
    _positive("privacy.client_level.noise_multiplier", p.client_level.noise_multiplier)
    _positive("privacy.client_level.clipping_norm", p.client_level.clipping_norm)
    if p.client_level.delta is not None:
        _check(0.0 < p.client_level.delta < 1.0, f"privacy.client_level.delta must be in (0, 1), got {p.client_level.delta}")
    cl = p.client_level
    _choice("privacy.client_level.clipping", cl.clipping, ("server", "client"))
    _check(0.0 <= cl.target_quantile <= 1.0,
           f"privacy.client_level.target_quantile must be in [0, 1], got {cl.target_quantile}")
    _positive("privacy.client_level.clip_norm_lr", cl.clip_norm_lr)
    if cl.clipped_count_stddev is not None:
        _check(cl.clipped_count_stddev > cl.noise_multiplier / 2,
               f"privacy.client_level.clipped_count_stddev must be > noise_multiplier / 2 "
               f"({cl.noise_multiplier / 2}) for adaptive clipping, got {cl.clipped_count_stddev}")
    _check(not (p.secure_mode and p.noise_seed is not None),
           f"privacy.secure_mode=true draws noise from the OS CSPRNG and cannot honour privacy.noise_seed={p.noise_seed}; "
           "unset privacy.noise_seed")

    t = cfg.train
    _positive("train.batch_size", t.batch_size)
    _positive("train.physical_batch_size", t.physical_batch_size)
    _positive("train.local_steps", t.local_steps)
    _positive("train.lr", t.lr)
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    # lr × weight_decay ≥ 1 flips or blows up the weights whatever the data: a lever for overflow.
    _check(t.lr * t.weight_decay < 1, f"train.lr × train.weight_decay must be < 1, got {t.lr * t.weight_decay:g}")
    _positive("train.threads", t.threads, allow_none=True)
    _positive("train.eval_batch_size", t.eval_batch_size)
    # Which of these the machine can run is checked where it trains (fedslm.train.device).
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16", "fp16"))
    if t.precision == "fp16" and cfg.privacy.clipping_mode == "ghost":
        raise ConfigError("train.precision fp16 needs a loss scale, which privacy.clipping_mode ghost does not take; "
                          "use train.precision bf16 or fp32, or privacy.clipping_mode hooks")

    f = cfg.federation
    _positive("federation.num_clients", f.num_clients)
    _positive("federation.rounds", f.rounds)
    _choice("federation.strategy", f.strategy, STRATEGIES)
    _positive("federation.min_clients", f.min_clients)
    _federation_strategy(cfg)
    _check(f.min_clients <= f.num_clients,
           f"federation.min_clients must be <= federation.num_clients ({f.num_clients}), got {f.min_clients}")
    for key in ("fraction_train", "fraction_evaluate"):
        value = getattr(f, key)
        _check(0.0 < value <= 1.0, f"federation.{key} must be in (0, 1], got {value}")
    _positive("federation.evaluate_every", f.evaluate_every)
    _choice("federation.partitioner", f.partitioner, PARTITIONERS)
    _positive("federation.dirichlet_alpha", f.dirichlet_alpha)
    if f.partitioner == "column":
        _check(bool(f.partition_column), "federation.partition_column must name a column when federation.partitioner=column")
    _check(f.proximal_mu >= 0, f"federation.proximal_mu must be >= 0, got {f.proximal_mu}")
    _positive("federation.server_lr", f.server_lr)
    _positive("federation.lora_server_lr", f.lora_server_lr, allow_none=True)
    _check(f.lora_server_lr is None or f.strategy == "fedadam",
           f"federation.lora_server_lr applies to federation.strategy 'fedadam' only, got '{f.strategy}'")
    _check(f.ema is None or 0.0 <= f.ema < 1.0, f"federation.ema must be in [0, 1) or null, got {f.ema}")
    _positive("federation.round_timeout", f.round_timeout)
    _positive("federation.client_cpus", f.client_cpus)
    _check(f.client_gpus >= 0, f"federation.client_gpus must be >= 0 (0: CPU only; 0.25: four institutions share "
                               f"one GPU), got {f.client_gpus}")
    _positive("federation.max_update_norm", f.max_update_norm, allow_none=True)
    _positive("federation.max_message_bytes", f.max_message_bytes, allow_none=True)
    _choice("federation.transfer_dtype", f.transfer_dtype, ("float32", "float16"))
    _check(not (f.transfer_dtype == "float16" and cl.enabled and cl.clipping == "client"),
           "federation.transfer_dtype=float16 would round a node's clipped update past its bound "
           "(privacy.client_level.clipping=client); use float32, or clipping=server")
    sa = f.secagg
    _check(0.0 < sa.shares <= 1.0, f"federation.secagg.shares must be in (0, 1], got {sa.shares}")
    _check(0.0 < sa.threshold <= 1.0, f"federation.secagg.threshold must be in (0, 1], got {sa.threshold}")
    _positive("federation.secagg.clipping_range", sa.clipping_range)
    _positive("federation.secagg.max_weight", sa.max_weight)
    if sa.quantization_range is not None:
        _check(2 <= sa.quantization_range <= 2**30,
               f"federation.secagg.quantization_range must be in [2, 2**30], got {sa.quantization_range}")
        _check(sa.quantization_range * f.num_clients < 2**32,
               f"federation.secagg.quantization_range x federation.num_clients must stay below 2**32 (the mask "
               f"modulus) or sums overflow; got {sa.quantization_range} x {f.num_clients}")
    if f.secure_aggregation:
        _check(f.min_clients >= 3,
               f"federation.secure_aggregation needs federation.min_clients >= 3 (with 2, each institution "
               f"could subtract its own update from the sum and read the other's); got {f.min_clients}")
        _check(not (cl.enabled and cl.clipping == "server"),
               "federation.secure_aggregation hides each institution's update from the coordinator, so it cannot "
               "clip them: set privacy.client_level.clipping=client")
    dist = p.distributed
    _check(dist.honest >= 1, f"privacy.distributed.honest must be >= 1, got {dist.honest}")
    _positive("privacy.distributed.max_epsilon_alone", dist.max_epsilon_alone, allow_none=True)
    if sa.distributed_noise:
        _check(f.secure_aggregation, "federation.secagg.distributed_noise needs federation.secure_aggregation=true "
                                     "(only the secure sum carries every node's share of the noise)")
        _check(p.enabled, "federation.secagg.distributed_noise is DP noise: it needs privacy.enabled=true")
        _check(dist.honest <= f.min_clients,
               f"privacy.distributed.honest={dist.honest} counts on more contributors than federation.min_clients="
               f"{f.min_clients} guarantees")
        _check(cfg.lora.layers == 0 and cfg.train.full_batch and cfg.train.local_steps == 1,
               "federation.secagg.distributed_noise releases one noised full-batch sum of the head's gradients a "
               "round: it needs lora.layers=0, train.full_batch=true and train.local_steps=1")
        _check(cfg.train.optimizer == "sgd" and cfg.train.momentum == 0 and cfg.train.weight_decay == 0,
               "federation.secagg.distributed_noise: the coordinator steps by -lr x the decoded sum, which is a node's "
               "step only with train.optimizer=sgd, train.momentum=0 and train.weight_decay=0")
        _check(not cl.enabled, "federation.secagg.distributed_noise and privacy.client_level are two noise schemes; "
                               "pick one")
        _check(p.noise_multiplier is None, "federation.secagg.distributed_noise calibrates its own noise: leave "
                                           "privacy.noise_multiplier unset")
        _check(p.delta is not None, "federation.secagg.distributed_noise needs one privacy.delta for every node (with "
                                    "δ = 1/(10 n) each node would plan another variance for the sum, and the shares "
                                    "would not add up to the larger nodes' plans)")
        _check(1 <= sa.lattice_bits <= 24, f"federation.secagg.lattice_bits must be in [1, 24], got {sa.lattice_bits}")
        from fedslm.privacy.distributed import check_wire
        from fedslm.config.secagg import quantization_range

        check_wire(quantization_range(cfg), sa.clipping_range)
    _check(bool(cfg.output.dir.strip()), "output.dir must be a folder path, got ''")
    unknown = [t for t in cfg.output.tracking if t not in ("mlflow", "tensorboard")]
    _check(not unknown, f"output.tracking lists {unknown}; it takes mlflow and/or tensorboard")


# Robust strategies: the fewest replies each needs to withstand f hostile ones.
_ROBUST_MIN = {"median": ("2f + 1", lambda f: 2 * f + 1), "krum": ("2f + 3", lambda f: 2 * f + 3),
               "multi_krum": ("2f + 3", lambda f: 2 * f + 3), "bulyan": ("4f + 3", lambda f: 4 * f + 3)}


def _federation_strategy(cfg: Config) -> None:
    f = cfg.federation
    _choice("federation.weighting", f.weighting, WEIGHTINGS)
    _check(f.max_weight_ratio >= 1.0 and f.max_weight_ratio < float("inf"),
           f"federation.max_weight_ratio must be a finite number >= 1, got {f.max_weight_ratio}")
    _positive("federation.max_weight", f.max_weight, allow_none=True)
    _check(isinstance(f.byzantine, int) and f.byzantine >= 0, f"federation.byzantine must be >= 0, got {f.byzantine}")
    _check(0.0 <= f.trim_fraction < 0.5, f"federation.trim_fraction must be in [0, 0.5), got {f.trim_fraction}")
    _positive("federation.krum_select", f.krum_select, allow_none=True)
    robust = f.strategy in ("median", "trimmed_mean", "krum", "multi_krum", "bulyan")
    if not robust:
        return
    # Why these two never compose: fedslm.coordinator.server.robust_conflict (the same words).
    _check(not f.secure_aggregation,
           f"federation.strategy={f.strategy} needs each institution's update, but federation.secure_aggregation=true "
           "shows the coordinator only their sum; use fedavg, fedprox or fedadam with secure aggregation")
    _check(not cfg.privacy.client_level.enabled,
           f"federation.strategy={f.strategy} does not compose with privacy.client_level: its noise is calibrated to the "
           "sensitivity C/k of an unweighted mean of k clipped updates, and a robust rule's sensitivity to one "
           "institution is not C/k in general (a median or Krum's pick can move by up to 2C); use fedavg, fedprox "
           "or fedadam with client-level DP")
    if f.strategy == "trimmed_mean":
        cut = int(f.trim_fraction * f.min_clients)
        _check(cut >= f.byzantine,
               f"federation.strategy=trimmed_mean cuts int(federation.trim_fraction x federation.min_clients) = {cut} "
               f"update(s) from each side, fewer than federation.byzantine={f.byzantine}; raise trim_fraction or "
               "min_clients")
    elif f.strategy in _ROBUST_MIN:
        rule, need = _ROBUST_MIN[f.strategy]
        _check(f.min_clients >= need(f.byzantine),
               f"federation.strategy={f.strategy} with federation.byzantine={f.byzantine} needs federation.min_clients "
               f">= {rule} = {need(f.byzantine)}, got {f.min_clients}")
    if f.strategy == "multi_krum" and f.krum_select is not None:
        _check(f.krum_select <= f.min_clients - f.byzantine,
               f"federation.krum_select must be <= federation.min_clients - federation.byzantine = "
               f"{f.min_clients - f.byzantine}, got {f.krum_select}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
