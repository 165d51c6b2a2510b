"""The typed configuration of a fedslm run.

Every key a user can set lives here, with its default. YAML files and
``key=value`` overrides are merged onto these dataclasses by
:mod:`fedslm.config.load`, which also validates values (see ``validate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

TASKS = ("classification", "causal_lm")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")
WEIGHTINGS = ("examples", "equal")
PARTITIONERS = ("iid", "dirichlet", "column")
ACCOUNTANTS = ("rdp", "prv")
OPTIMIZERS = ("adamw", "sgd")
POOLINGS = ("cls", "mean")


@dataclass
class ModelConfig:
    # A bundled preset (see fedslm.models.presets) or a local Hugging Face directory.
    name: str = "minilm"
    task: str = "classification"
    max_length: int = 64
    # Seeds the freshly initialised task head so every node builds the same base.
    init_seed: int = 0
    # What a classifier's head reads: "cls" (the encoder's [CLS] pooler, Hugging Face's default) or
    # "mean" (the masked mean of the token vectors, what sentence encoders like MiniLM were trained for).
    pooling: str = "cls"
    # With pooling "mean": divide the pooled vector by its L2 norm (sentence-transformers' Normalize,
    # how all-MiniLM-L6-v2 embeds a sentence). A head on unit vectors has per-record gradients of a
    # known size, which DP clipping rewards.
    normalize: bool = False
    # The classifier head's start: "random" (drawn from init_seed) or "label-names" (each class's row
    # is the base's normalised embedding of its label name, times head_prior_scale: public, so it
    # costs no privacy; the coordinator puts it in the first global adapter).
    head_init: str = "random"
    head_prior_scale: float = 10.0
    # Dropout on a classifier head's input while training; None: the base's (MiniLM: 0.1). The DP
    # recipe sets 0: DP noise regularises already, and a dropped feature is signal the clipped
    # gradient paid for (benchmarks/results/recipe.md).
    classifier_dropout: Optional[float] = None
    # How the frozen prefix's cached vectors (lora.layers set) are computed: "auto" in bfloat16 where the
    # machine multiplies it natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16), 3x faster
    # there and within 1e-4 of fp32 (cosine; benchmarks/results/speed.md), else fp32; "fp32" always.
    # Stored and trained in fp32 either way; part of the feature cache's key.
    feature_precision: str = "auto"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # None: the preset's (or the architecture's) attention projections.
    target_modules: Optional[List[str]] = None
    # FFA-LoRA (Sun et al., ICLR 2024): A is drawn from train.seed on every node and frozen; only B
    # (and a classifier head) is trained, noised, sent and averaged, so the average of the B·A
    # products is exactly the product of the averages, and DP noise goes into half the dimensions.
    ffa: bool = False
    # LoRA on the top ``layers`` encoder layers only (PEFT's layers_to_transform); 0: the classifier
    # head alone. None: every layer. When set, the frozen layers below are computed once per node and
    # cached (fedslm.train.prefix), and training runs from there: most of a step's cost disappears.
    layers: Optional[int] = None
    # Train the classifier's bias (false: it starts at 0 and no node trains or noises it). With
    # unit-length features a record's head gradient is e·[x; 1], of norm |e|·√2 with the bias and |e|
    # without: the bias takes half of every clipped gradient's squared norm, while the features' common
    # mean direction already gives the head a bias of its own. Off, the weights get √2 times the
    # clipped signal for the same noise (benchmarks/results/recipe.md).
    head_bias: bool = True
    # LP-FT (fedslm.train.lpft; Kumar et al. 2022): the rounds before this one train the classifier head alone
    # on the cached sentence vectors (a linear probe; LoRA stays at its start, B = 0), and LoRA on the top
    # lora.layers layers trains from this round on, starting from that probe. None: LoRA trains from round 1.
    # Needs lora.layers >= 1. Every round costs the plan's steps of privacy whichever tensors it trains.
    from_round: Optional[int] = None
    # Whether the classifier head trains beside LoRA (false: once LoRA trains, the head stays as the probe
    # rounds left it; every clipped gradient is then LoRA's, and no noise lands on the head).
    train_head: bool = True


@dataclass
class DataConfig:
    # A bundled dataset name (see fedslm.data.bundled) or a path to a .csv/.jsonl file.
    source: str = "icd10"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    # The label set all nodes agree on, in index order; the coordinator needs it (it holds no data). None: the
    # bundled dataset's, or sorted from the data (`fedslm simulate` writes those into the run config).
    labels: Optional[List[str]] = None
    # Held-out share of a node's own file for evaluation (bundled data has a fixed split).
    test_fraction: float = 0.1
    split_seed: int = 0
    # Use at most this many training records (None: all of them).
    max_train_records: Optional[int] = None
    max_test_records: Optional[int] = None


@dataclass
class DistributedConfig:
    """A node's trust under distributed noise (federation.secagg.distributed_noise). In simulation the
    scenario stands for every node; a deployed node's policy decides (privacy.assume_honest there)."""

    # Contributors to the secure sum whose noise share a node counts on, itself included; 1 trusts no
    # one (each node adds all the noise for its ε itself).
    honest: int = 1
    # Cap on the ε of a node's own noise alone (were no one else to add any); None: no cap beyond
    # privacy.max_epsilon (which caps the ε of the sum).
    max_epsilon_alone: Optional[float] = None


@dataclass
class ClientLevelConfig:
    """Client-level DP at aggregation, with Flower's DP strategy wrappers: each institution's update
    is clipped to a norm bound (L2, from the global adapter), the plain average is taken, and
    Gaussian noise of std noise_multiplier x clipping_norm / k is added, k the updates averaged. Protects each
    institution's whole contribution, on top of record-level DP at each node."""

    enabled: bool = False
    noise_multiplier: float = 1.0
    # The clipping bound; with adaptive=true, its starting value.
    clipping_norm: float = 0.1
    # Where updates are clipped: "server" (the coordinator clips what it receives) or "client" (each
    # node clips before sending; the coordinator checks the bound). Secure aggregation needs "client".
    clipping: str = "server"
    # Adapt the bound each round towards the target_quantile of update norms (Andrew et al. 2021).
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    # Noise on the count of clipped updates; None: the larger of institutions/20 and
    # 1.2 x noise_multiplier (so the updates' noise grows by at most 10%).
    clipped_count_stddev: Optional[float] = None
    # None: min(1e-5, 1 / (10 x federation.num_clients)).
    delta: Optional[float] = None


@dataclass
class PrivacyConfig:
    enabled: bool = True
    target_epsilon: float = 8.0
    # None: 1 / (10 n), below 1/n for a node with n training records.
    delta: Optional[float] = None
    max_grad_norm: float = 1.0
    # The node's hard cap on its total spend in the ledger; None: target_epsilon.
    max_epsilon: Optional[float] = None
    # Ledger file; None: <output.dir>/privacy_ledger.json. (On a federation node its policy decides.)
    ledger: Optional[str] = None
    # The privacy unit the ledger charges: a name for the people whose records these are, not a
    # hash of them, so a new split, subset or one added record is charged to the same budget.
    unit: str = "all-records"
    accountant: str = "rdp"
    # Set to fix sigma yourself instead of calibrating it to the plan.
    noise_multiplier: Optional[float] = None
    # Noise and Poisson sampling from the OS CSPRNG (fedslm.privacy.csprng) instead of torch's
    # generator; incompatible with noise_seed.
    secure_mode: bool = False
    # Seeds DP noise and Poisson sampling from (seed, dataset, round), for reproducible research runs
    # only: a rerun draws the same (a model's own dropout is not seeded by it). Leave null in
    # deployment: anyone who knows the seed can subtract the noise, and two runs with the same seed
    # share it.
    noise_seed: Optional[int] = None
    # How per-record gradients are clipped: "hooks" (Opacus' per-sample gradients, memory grows with the
    # batch) or "ghost" (ghost clipping: per-record norms without per-record gradients, memory flat in
    # the batch; fedslm.privacy.ghost).
    clipping_mode: str = "hooks"
    client_level: ClientLevelConfig = field(default_factory=ClientLevelConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class TrainConfig:
    # Expected logical batch size: Poisson sampling at rate batch_size / n.
    batch_size: int = 64
    # Records per forward/backward pass; bounds memory, never changes the maths.
    physical_batch_size: int = 32
    local_steps: int = 10
    lr: float = 2e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    # Heavy-ball momentum of train.optimizer "sgd" (noised gradients are averaged over steps).
    momentum: float = 0.0
    # Every step uses every training record (sample rate 1; train.batch_size is then unused): the
    # DP recipe for a cheap step (lora.layers: 0), full-batch DP-GD with many steps.
    full_batch: bool = False
    seed: int = 0
    # torch intra-op threads; None leaves torch's default.
    threads: Optional[int] = None
    eval_batch_size: int = 128
    # Forward/backward arithmetic: fp32, bf16, fp16, or auto (bf16 where the device supports it, fp32 on
    # the CPU). Per-record norms, clipping, noise and the released update always stay fp32.
    precision: str = "auto"


@dataclass
class SecAggConfig:
    """Tuning of SecAgg+ (federation.secure_aggregation=true)."""

    # Share of the round's institutions each one shares its secrets with (1.0: all of them).
    shares: float = 1.0
    # Share of those shares needed to rebuild a secret: a round survives dropouts as long as every
    # institution keeps at least this many live neighbours; a coordinator must corrupt this many
    # institutions to unmask one. Deployed nodes refuse a threshold of half the shares or fewer: a
    # coordinator telling one half "u dropped" and the other "u is alive" would rebuild both of u's
    # secrets and unmask u's update.
    threshold: float = 0.75
    # Each coordinate of an update is clipped to [-clipping_range, clipping_range] before it is
    # quantised (nodes report how many they clipped); the update is the change to the adapter.
    clipping_range: float = 1.0
    # Quantisation levels over [-clipping_range, clipping_range]; times institutions must stay
    # below 2**32 (the mask modulus). None: the largest power of two that does (at most 2**30).
    quantization_range: Optional[int] = None
    # Largest weight (training records) an institution's update carries; larger ones count as this.
    max_weight: float = 100000.0
    # Distributed DP (fedslm.privacy.distributed): each node adds its share of integer (Skellam) noise to
    # its gradient sum on the protocol's lattice, so the unmasked sum carries one sum's noise for the ε
    # of the sum; how much each adds is the node's trust (privacy.distributed). Head-only full batch only.
    distributed_noise: bool = False
    # Under distributed_noise: the clip norm spans 2**lattice_bits lattice units (more bits: less rounding
    # noise; every node's records × 2**bits must fit in ±quantization_range / 2).
    lattice_bits: int = 13


@dataclass
class FederationConfig:
    num_clients: int = 5
    rounds: int = 3
    strategy: str = "fedavg"
    # Rounds go ahead while at least this many institutions reply.
    min_clients: int = 2
    # Share of institutions sampled for training / evaluation each round.
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    # The institutions score the global adapter every this many rounds, and after the last: each
    # evaluation is an exchange with every node (and, deployed, a release each node pays ε for).
    evaluate_every: int = 1
    # How simulated institutions split the data: iid, dirichlet (over labels), or column.
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    # For partitioner=column: each distinct value of this column is one institution.
    partition_column: Optional[str] = None
    partition_seed: int = 0
    # How fedavg/fedprox/fedadam weigh a reply: by its claimed record count (screened, then clamped to
    # max_weight_ratio x the round's lower median claim and to max_weight), or equal. Robust
    # strategies and client-level DP always weigh every institution equally. One liar among n then holds
    # at most max_weight_ratio / (max_weight_ratio + n - 1) of the average, whatever it claims.
    weighting: str = "examples"
    # A claimed record count counts at most this many times the round's lower median claim.
    max_weight_ratio: float = 2.0
    # An absolute cap on any reply's weight (records); None: only the ratio above.
    max_weight: Optional[float] = None
    # Robust strategies: how many hostile institutions to tolerate (krum, multi_krum, bulyan; and the
    # least trimmed_mean and median must withstand).
    byzantine: int = 1
    # The share trimmed_mean cuts from each side of every coordinate.
    trim_fraction: float = 0.2
    # How many updates multi_krum averages (None: replies - byzantine).
    krum_select: Optional[int] = None
    # FedProx proximal term and FedAdam server learning rate.
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    # fedadam: the server step of the LoRA tensors (None: server_lr). Adam moves every coordinate by about its
    # step size a round: the head's rows (length ~10 from the label-name prior) take 0.3, while LoRA's B
    # starts at 0 (make run-lora steps it at 1e-3).
    lora_server_lr: Optional[float] = None
    # Decay β of an exponential moving average of the global adapter over rounds (a post-processing of
    # what the coordinator publishes each round: no privacy cost); the average is what institutions
    # evaluate and what the run saves, while training continues from the plain global adapter. It
    # damps the DP noise of the last rounds. None: no average.
    ema: Optional[float] = None
    # Also train each institution alone under the same ε, to show what federation adds.
    compare_local: bool = False
    # Seconds the server waits for replies in a round.
    round_timeout: float = 3600.0
    # Ray workers' CPUs per simulated institution.
    client_cpus: int = 1
    # Ray GPUs per simulated institution (fractions share one GPU: 0.25 puts four on it); 0: CPU only.
    client_gpus: float = 0.0
    # Simulation on a multi-machine Ray cluster: its address (e.g. "auto" on a cluster node, or
    # "ray://head:10001"); None: a private Ray instance on this machine.
    ray_address: Optional[str] = None
    # Updates that move the adapter further than this (L2) are rejected; None: a generous bound
    # derived from lr x local steps (see fedslm.coordinator.screen).
    max_update_norm: Optional[float] = None
    # Replies whose records add up to more bytes than this are refused before they are parsed;
    # None: twice the adapter's size plus 1 MiB for metrics.
    max_message_bytes: Optional[int] = None
    # Before round 1, every institution evaluates the initial adapter (round 0 in metrics.jsonl):
    # the "before" next to the final "after".
    evaluate_initial: bool = False
    # Adapters travel as float32 or float16 (half the bytes; the coordinator averages in float32).
    transfer_dtype: str = "float32"
    # SecAgg+ (Flower's protocol): the coordinator only ever sees the sum of the updates.
    secure_aggregation: bool = False
    secagg: SecAggConfig = field(default_factory=SecAggConfig)


@dataclass
class OutputConfig:
    dir: str = "runs/latest"
    # A run folder holding an unfinished run's checkpoint is resumed from its last finished round
    # (same config required); false: such a folder is an error.
    resume: bool = True
    # Also log every round to these experiment trackers (offline; the `tracking` extra): mlflow, tensorboard.
    tracking: List[str] = field(default_factory=list)
    # MLflow's tracking store; None: sqlite:///RUN_DIR/mlflow.db.
    mlflow_uri: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
