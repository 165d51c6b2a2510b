"""The node policy: what an institution decides for itself, read only on its own machine.

A coordinator's request can vary only what the policy lets vary (rounds, steps, batch, lr, LoRA
shape, strategy-side settings; see :mod:`fedslm.node.plan`). Everything that decides privacy is
here: which records, their fixed train/held-out split, the privacy unit the ledger charges, the
ledger's path, the ε and δ caps, whether a non-private round is ever allowed, whether noise must
come from the OS CSPRNG, which base models may be loaded, and the smallest held-out set the node
will score.

The SuperNode names the file in its node config (``--node-config 'policy="/etc/fedslm/node.yaml"'``).
``fedslm node init`` writes a commented template (:mod:`fedslm.node.policy_template`) and
``fedslm node check`` validates one.

A node that truly holds two disjoint datasets (two registries about different people) runs one
SuperNode per dataset, each with its own policy and its own ``privacy.unit`` name (they may share
one ledger file: budgets are kept per unit). Two datasets that may hold the same people are one
unit: give both policies the same ``privacy.unit`` and ledger, and every round on either is
charged to one budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedslm.config.schema import ACCOUNTANTS, DataConfig
from fedslm.config.yamlfile import DuplicateKeyError, load_yaml
from fedslm.errors import ConfigError
from fedslm.node.policy_template import TEMPLATE, proposed_floor, template  # noqa: F401 - re-exported

# The node-config key naming the policy file.
NODE_POLICY = "policy"
# Optional node-config key: a small public integer naming the institution in the coordinator's metrics.
NODE_INSTITUTION = "institution"


class PolicyError(ConfigError):
    """The node's own policy is missing, incomplete or invalid: the node's operator must fix it."""


@dataclass
class PolicyData:
    # The node's own records: a .csv or .jsonl file (or a bundled dataset name, for trials).
    source: str = ""
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    # The label set this institution agreed to, in index order (required for classification). A
    # request's label set must equal it: a node that checked a request's labels against its records
    # would tell a prober, by accepting or refusing, whether some record carries a given label.
    labels: Optional[List[str]] = None
    # The held-out share and the seed of the node's fixed train/held-out split.
    test_fraction: float = 0.1
    split_seed: int = 0
    # The node never scores fewer held-out records than this, whatever a request asks.
    min_test_records: int = 50
    # Whether the number of training records may be sent (FedAvg then weighs this node by it), with
    # what reveals it (sample rate, σ, the ε spent); false: all withheld and the node counts as 1.
    size_is_public: bool = False
    # With the size private: a public lower bound on the number of training records. The noise is
    # planned and charged for it (σ for rate b/floor), so the noise level a coordinator can measure in
    # the update says nothing about the count beyond "at least the floor", nor does the refusal of a batch
    # above it. None: the largest power of two at or below the count (default_floor; node check warns).
    size_floor: Optional[int] = None

    def data_config(self, max_test_records: Optional[int] = None) -> DataConfig:
        """The data section the loaders take: this node's file, columns, label set and split, never the
        request's (a request may only shorten the held-out set, down to min_test_records)."""
        return DataConfig(source=self.source, text_column=self.text_column, label_column=self.label_column,
                          prompt_column=self.prompt_column, completion_column=self.completion_column,
                          labels=self.labels, test_fraction=self.test_fraction, split_seed=self.split_seed,
                          max_test_records=max_test_records)


@dataclass
class PolicyEvaluation:
    """Federated evaluation as a DP release on the held-out records, a privacy unit of their own."""

    unit: str = "held-out"
    # The held-out unit's budget over every evaluation, and what each one costs (at privacy.max_delta).
    max_epsilon: float = 10.0
    epsilon_per_evaluation: float = 1.0
    # Which metrics are released (noised): accuracy (classification) and/or loss. The record count is
    # always released, noised; macro-F1 never.
    release: List[str] = field(default_factory=lambda: ["accuracy", "loss"])
    # Each record's loss is clipped to [0, loss_cap] before it is summed (the loss sum's sensitivity).
    loss_cap: float = 10.0


@dataclass
class PolicyPrivacy:
    # The privacy unit every round on this node's records is charged to (see the module docstring).
    unit: str = "all-records"
    # The ledger file (kept forever; losing it must never reset the budget).
    ledger: Optional[str] = None
    # Caps of this node's guarantee: total ε over every round and run, at δ = max_delta.
    max_epsilon: Optional[float] = None
    max_delta: Optional[float] = None
    accountant: str = "rdp"
    # Whether a round with no DP at all (ε = ∞) may ever run on these records.
    allow_non_private: bool = False
    # DP noise and Poisson sampling from the OS CSPRNG, whatever the request says. Leave it on: torch's
    # generator takes a 32-bit seed, so a coordinator could search every seed and subtract the noise.
    require_secure_noise: bool = True
    # Send an update only inside secure aggregation (SecAgg+).
    require_secure_aggregation: bool = False
    # Distributed noise (a run's federation.secagg.distributed_noise): how many contributors to the secure
    # sum, this node included, it counts on to add their share of the noise. 1 trusts no one: the node
    # adds all the noise for its ε itself. k > 1 adds 1/k of it, so the sum's ε holds only if k of the
    # contributors are honest; the node then refuses to unmask in a sum of fewer than k survivors, and
    # max_epsilon_alone (required) caps the ε of its own noise alone, should the others add none.
    assume_honest: int = 1
    max_epsilon_alone: Optional[float] = None


@dataclass
class PolicySecureAggregation:
    """What this node accepts of the SecAgg+ protocol's parameters (checked in each stage)."""

    # The smallest cohort (institutions in the round) and neighbour set it masks its update in.
    min_cohort: int = 3
    # The fewest shares that may rebuild one of its secrets. Always also more than half its shares.
    min_threshold: int = 2
    # This institution's identity key (``fedslm node keygen``): it signs the node's SecAgg+ keys each
    # round, so that the other institutions can tell this node from one the coordinator made up.
    identity_key: Optional[str] = None
    # The other institutions' public identity keys, exchanged out of band: {name: path to its .pub}.
    # With none listed the node cannot tell a real neighbour from a coordinator's (see fedslm.wire.identity).
    peers: Dict[str, str] = field(default_factory=dict)
    # The largest share of a round's neighbours whose keys no listed institution signed (with peers listed).
    max_unverified_share: float = 0.0
    # How many institutions this node guards against colluding with the coordinator. A colluder signs
    # and answers for every story the coordinator tells, so the "more than half" rules hold against c of
    # them only with a threshold t of n shares such that 2t > n + c (Bonawitz et al. 2017), and a sum
    # counted on for k honest contributors needs k + c members (min_cohort). 0: institutions are honest.
    max_colluding: int = 0


@dataclass
class PolicyResources:
    """How much memory one request may make this node use: a coordinator must not be able to exhaust it."""

    # Records in one forward and backward pass (a request's train.physical_batch_size is capped to it: it
    # only chunks the logical batch, so what is computed does not change).
    max_physical_batch_size: int = 128
    # Records per chunk when only the head trains on cached sentence vectors (lora.layers: 0): one
    # vector of the encoder's width a record and no model pass (65,536 × 384 floats is 100 MB, plus a
    # few chunk × labels tensors; the labels are the node's own). Uncached, the model-pass cap applies.
    max_feature_batch_size: int = 65536
    # Records in one evaluation or prediction pass (train.eval_batch_size is capped to it).
    max_eval_batch_size: int = 512
    # Tokens per record: a request's model.max_length above it is refused (truncation changes what is trained).
    max_length: int = 256
    # Where this node trains and scores: auto (an accelerator torch sees, else the CPU), cpu, cuda, cuda:N
    # or mps. The node decides; a request never does.
    device: str = "auto"
    # Work one request may ask for, refused as refused-by-policy before anything is planned or charged.
    max_rounds_per_run: int = 1000
    max_local_steps: int = 10000
    max_lora_rank: int = 64
    # Memory one round may plan to use (model, adapter, optimiser state, batches), in GiB.
    max_memory_gb: float = 16.0
    # Wall time of one round's training on this node; a round past it is ended.
    max_seconds_per_round: float = 3600.0


@dataclass
class PolicyModels:
    # Base models this node may load: bundled preset names, or local model folders it vouches for.
    allowed: List[str] = field(default_factory=lambda: ["minilm"])
    # If set, the loaded base (with its task head) must have one of these fingerprints.
    fingerprints: Optional[List[str]] = None


@dataclass
class NodePolicy:
    # The institution's name in this node's own log lines and files.
    name: str = "institution"
    data: PolicyData = field(default_factory=PolicyData)
    privacy: PolicyPrivacy = field(default_factory=PolicyPrivacy)
    models: PolicyModels = field(default_factory=PolicyModels)
    secure_aggregation: PolicySecureAggregation = field(default_factory=PolicySecureAggregation)
    evaluation: PolicyEvaluation = field(default_factory=PolicyEvaluation)
    resources: PolicyResources = field(default_factory=PolicyResources)
    # torch threads for training on this node; None: torch's default.
    threads: Optional[int] = None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PolicyError(message)


def _finite_floats(obj: Any, where: str, allow_inf: set[str], prefix: str = "") -> None:
    """Every ε, δ, cap and share is a finite number: ``.inf`` passes every ``> 0`` check and is no cap
    at all (``evaluation.max_epsilon: .inf`` would never refuse an evaluation), ``.nan`` fails every
    comparison silently. ``allow_inf``: the one key where ∞ is meaningful (privacy.max_epsilon with
    non-private rounds allowed: such a round costs ε = ∞)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _finite_floats(value, where, allow_inf, key + ".")
        elif isinstance(value, float) and not math.isfinite(value) and not (math.isinf(value) and key in allow_inf):
            raise PolicyError(f"{where}: {key} must be a finite number, got {value}")


def validate_policy(policy: NodePolicy, *, complete: bool = True, where: str = "node policy") -> None:
    """Reject values no node could use, naming the key. ``complete``: every key a deployed node needs
    (data source, ledger, ε and δ caps) must be set."""
    d, p = policy.data, policy.privacy
    _finite_floats(policy, where, allow_inf={"privacy.max_epsilon"} if p.allow_non_private else set())
    if complete:
        for key, value in (("data.source", d.source.strip()), ("privacy.ledger", p.ledger),
                           ("privacy.max_epsilon", p.max_epsilon), ("privacy.max_delta", p.max_delta)):
            _check(value not in (None, ""), f"{where}: {key} is required (a node without it refuses to serve)")
    _check(bool(policy.name.strip()), f"{where}: name must not be empty")
    _check(0.0 < d.test_fraction < 1.0, f"{where}: data.test_fraction must be in (0, 1), got {d.test_fraction}")
    _check(d.min_test_records >= 1, f"{where}: data.min_test_records must be >= 1, got {d.min_test_records}")
    _check(d.size_floor is None or d.size_floor >= 1, f"{where}: data.size_floor must be >= 1, got {d.size_floor}")
    if d.labels is not None:
        _check(len(d.labels) >= 2 and len(set(d.labels)) == len(d.labels),
               f"{where}: data.labels must list at least 2 distinct labels, got {d.labels}")
    _check(bool(p.unit.strip()), f"{where}: privacy.unit must name the privacy unit, got ''")
    if p.max_epsilon is not None:
        _check(p.max_epsilon > 0 and not math.isnan(p.max_epsilon),
               f"{where}: privacy.max_epsilon must be > 0, got {p.max_epsilon}")
        _check(not math.isinf(p.max_epsilon) or p.allow_non_private,
               f"{where}: privacy.max_epsilon=inf is no cap; set a finite ε")
    if p.max_delta is not None:
        _check(0.0 < p.max_delta < 1.0, f"{where}: privacy.max_delta must be in (0, 1), got {p.max_delta}")
    sa_ = policy.secure_aggregation
    _check(sa_.max_colluding >= 0, f"{where}: secure_aggregation.max_colluding must be >= 0, got {sa_.max_colluding}")
    _check(not sa_.peers or sa_.max_colluding < len(sa_.peers),
           f"{where}: secure_aggregation.max_colluding={sa_.max_colluding} must be below the {len(sa_.peers)} "
           "institutions in secure_aggregation.peers")
    _check(p.assume_honest >= 1, f"{where}: privacy.assume_honest must be >= 1, got {p.assume_honest}")
    if p.assume_honest > 1:
        _check(p.max_epsilon_alone is not None,
               f"{where}: privacy.max_epsilon_alone is required with privacy.assume_honest > 1 (the ε of this node's "
               "own noise, should the others add none)")
        sa = policy.secure_aggregation
        _check(sa.min_cohort >= p.assume_honest + sa.max_colluding,
               f"{where}: secure_aggregation.min_cohort={sa.min_cohort} must be at least privacy.assume_honest="
               f"{p.assume_honest} plus secure_aggregation.max_colluding={sa.max_colluding}")
        # Counting on others' noise needs knowing who the others are: every neighbour signed by a listed
        # institution, each signing its noise share with the survivor list.
        _check(bool(sa.identity_key) and bool(sa.peers) and sa.max_unverified_share == 0,
               f"{where}: privacy.assume_honest={p.assume_honest} needs secure_aggregation.identity_key, the other "
               "institutions in secure_aggregation.peers and max_unverified_share=0 (a neighbour the coordinator "
               "made up adds no noise)")
    if p.max_epsilon_alone is not None:
        _check(p.max_epsilon_alone > 0 and not math.isinf(p.max_epsilon_alone),
               f"{where}: privacy.max_epsilon_alone must be a finite ε > 0, got {p.max_epsilon_alone}")
    _check(p.accountant in ACCOUNTANTS,
           f"{where}: privacy.accountant must be one of {', '.join(ACCOUNTANTS)}; got {p.accountant!r}")
    _check(len(policy.models.allowed) > 0 and all(m.strip() for m in policy.models.allowed),
           f"{where}: models.allowed must list at least one preset or model folder")
    ev = policy.evaluation
    _check(bool(ev.unit.strip()) and ev.unit != p.unit,
           f"{where}: evaluation.unit must name the held-out records' own privacy unit, not privacy.unit")
    _check(0 < ev.epsilon_per_evaluation <= ev.max_epsilon,
           f"{where}: evaluation.epsilon_per_evaluation must be in (0, evaluation.max_epsilon], got "
           f"{ev.epsilon_per_evaluation}")
    _check(set(ev.release) <= {"accuracy", "loss"} and len(ev.release) > 0,
           f"{where}: evaluation.release must list accuracy and/or loss, got {ev.release}")
    _check(ev.loss_cap > 0, f"{where}: evaluation.loss_cap must be > 0, got {ev.loss_cap}")
    sa = policy.secure_aggregation
    _check(sa.min_cohort >= 3, f"{where}: secure_aggregation.min_cohort must be >= 3 (with 2, each learns the "
                               f"other's update from the sum), got {sa.min_cohort}")
    _check(sa.min_threshold >= 2, f"{where}: secure_aggregation.min_threshold must be >= 2, got {sa.min_threshold}")
    _check(0.0 <= sa.max_unverified_share < 1.0,
           f"{where}: secure_aggregation.max_unverified_share must be in [0, 1), got {sa.max_unverified_share}")
    _check(not sa.peers or sa.identity_key, f"{where}: secure_aggregation.peers needs secure_aggregation.identity_key "
                                            "(the others verify this node by it; make one with: fedslm node keygen)")
    for key in ("max_physical_batch_size", "max_feature_batch_size", "max_eval_batch_size", "max_length",
                "max_rounds_per_run", "max_local_steps", "max_lora_rank"):
        value = getattr(policy.resources, key)
        _check(isinstance(value, int) and value >= 1, f"{where}: resources.{key} must be an integer >= 1, got {value}")
    for key in ("max_memory_gb", "max_seconds_per_round"):
        value = getattr(policy.resources, key)
        _check(math.isfinite(value) and value > 0, f"{where}: resources.{key} must be a finite number > 0, got {value}")
    device = str(policy.resources.device).strip().lower()
    _check(device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()),
           f"{where}: resources.device must be one of auto, cpu, cuda, cuda:N, mps; got {policy.resources.device!r}")
    if policy.threads is not None:
        _check(policy.threads >= 1, f"{where}: threads must be >= 1, got {policy.threads}")


def load_policy(path: str | Path, *, complete: bool = True) -> NodePolicy:
    """Read and validate the node policy at ``path``; every error names the file and the key."""
    path = Path(path).expanduser()
    where = f"node policy {path}"
    if not path.is_file():
        raise PolicyError(f"{where} does not exist (write one with: fedslm node init {path})")
    try:
        content = load_yaml(path.read_text(encoding="utf-8"))
    except DuplicateKeyError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise PolicyError(f"{where} must hold a mapping (name, data, privacy, models), got {type(content).__name__}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(NodePolicy), OmegaConf.create(content))
        policy: NodePolicy = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise PolicyError(f"{where}: {key}: {str(getattr(exc, 'msg', exc)).splitlines()[0]}") from None
    validate_policy(policy, complete=complete, where=where)
    _require_absolute(policy, where)
    _resolve_identities(policy, path.parent, where)
    return policy


def _require_absolute(policy: NodePolicy, where: str) -> None:
    """The records and the ledger are named by absolute paths. A relative one is read from whatever folder
    the node happens to be started in: from another folder (a service manager's, a new shell's) the node
    would train on other records or open a fresh, empty ledger, a budget reset without a word."""
    from fedslm.data import bundled

    for key, value in (("data.source", policy.data.source), ("privacy.ledger", policy.privacy.ledger)):
        if not value or (key == "data.source" and bundled.get(value) is not None):
            continue
        if not Path(value).expanduser().is_absolute():
            raise PolicyError(f"{where}: {key} must be an absolute path, got {value!r} (a relative path depends on the "
                              f"folder the node is started from; from here it is {Path(value).resolve()})")


def _resolve_identities(policy: NodePolicy, folder: Path, where: str) -> None:
    """Identity key paths relative to the policy's folder, each key read once now so that a bad file
    stops the node at start, naming the key, rather than in a round."""
    from fedslm.wire import identity

    sa = policy.secure_aggregation

    def resolve(value: str) -> str:
        return str((folder / Path(value).expanduser()).resolve())

    try:
        if sa.identity_key:
            sa.identity_key = resolve(sa.identity_key)
            identity.load_private(sa.identity_key)
        for name in list(sa.peers):
            sa.peers[name] = resolve(sa.peers[name])
            identity.load_public(sa.peers[name])
    except identity.IdentityError as exc:
        raise PolicyError(f"{where}: secure_aggregation: {exc}") from None


def policy_dict(policy: NodePolicy) -> dict[str, Any]:
    return dataclasses.asdict(policy)


def default_floor(n: int) -> int:
    """The floor a node whose size is private plans its noise for when its policy sets no data.size_floor:
    the largest power of two at or below ``n``. Without any floor, σ (which the update's noise level
    shows) and the refusal of a batch larger than the records (which a search over batch sizes finds)
    would each give ``n`` exactly; with this one they give ⌊log2 n⌋ and no more, at a cost to utility of
    a sample rate at most twice the true one in the plan. A floor the operator sets (node init proposes
    two significant digits) wins: it is the public fact the operator chose."""
    return 1 << (max(int(n), 1).bit_length() - 1)
