"""A one-run privacy audit (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023).

m canaries (records no one would write: random words from the data's own vocabulary, with a
random label or completion) are each put into the training set independently with probability
1/2. The model is trained exactly as configured, once. Each canary is then scored by the trained
model (minus its per-record loss: a memorised canary has a low loss), and the auditor guesses
"in" for the k+ highest scores and "out" for the k- lowest, abstaining on the rest; k+ and k- are
fixed before looking. If training is (ε, δ)-DP, the number of correct guesses v out of r is
dominated by Binomial(r, e^ε / (1 + e^ε)) up to a δ term (their Theorem 5.2), so any ε under
which v correct guesses would have probability below 1 - confidence is ruled out: the largest such
ε is an empirical lower bound. The bound can only be as large as m allows (r guesses, all
correct, cap it), and a bound above the claimed ε means the implementation leaks more than it
claims.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from scipy import stats

from fedslm.config import Config
from fedslm.data import load_task_data
from fedslm.data.examples import CausalExample, ClassificationExample
from fedslm.data.tasks import get_task
from fedslm.errors import ConfigError
from fedslm.lora import wrap
from fedslm.models import load_base
from fedslm.privacy import Ledger
from fedslm.train.local import privacy_plan, round_spec, train_round
from fedslm.train.losses import PER_RECORD_LOSS


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """P[at least v of r guesses correct] if training were (eps, delta)-DP (Steinke et al., Thm 5.2)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-eps))  # the accuracy of eps-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):  # the delta term: max over i of P[v - i <= Binomial < v] / i
        below += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, below / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The largest ε ruled out at ``confidence`` by v correct out of r guesses over m canaries (0 if none)."""
    level = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return math.inf
    for _ in range(60):  # bisection: p_value(lo) < level <= p_value(hi)
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class AuditResult:
    canaries: int
    included: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    epsilon_lower_bound: float
    claimed_epsilon: Optional[float]  # None: training was not private (ε = ∞)
    max_bound: float  # the bound if every guess were right: what this m and r can show at most
    seconds: float
    scores_in: list[float] = field(default_factory=list)
    scores_out: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _canaries(task: str, train: list, labels: Optional[list[str]], m: int, rng: np.random.Generator,
              words: int = 8) -> list:
    vocab = sorted({w for ex in train for w in (ex.text if task == "classification"
                                                      else ex.prompt + " " + ex.completion).split()})
    if len(vocab) < 10:
        raise ConfigError(f"the audit draws canary words from the training data's vocabulary; it has only "
                          f"{len(vocab)} distinct words")
    out = []
    for _ in range(m):
        text = " ".join(vocab[i] for i in rng.integers(0, len(vocab), words))
        if task == "classification":
            out.append(ClassificationExample(text=text, label=int(rng.integers(0, len(labels)))))
        else:
            tail = " " + " ".join(vocab[i] for i in rng.integers(0, len(vocab), 3))
            out.append(CausalExample(prompt=text, completion=tail))
    return out


@torch.no_grad()
def _scores(model, encoded, task: str, batch: int = 64) -> np.ndarray:
    loss_of = PER_RECORD_LOSS[task]
    collate = get_task(task).collate
    model.eval()
    out = []
    for start in range(0, len(encoded), batch):
        idx = list(range(start, min(start + batch, len(encoded))))
        out.append(-loss_of(model, collate(encoded, idx)).float().numpy())
    return np.concatenate(out)


def run_audit(cfg: Config, canaries: int = 200, guess_fraction: float = 0.2, confidence: float = 0.95,
              seed: Optional[int] = None, progress: Optional[Callable[[str], None]] = None) -> AuditResult:
    """Train once as ``cfg`` says, with canaries, and return the empirical ε lower bound."""
    if canaries < 10:
        raise ConfigError(f"--canaries must be at least 10, got {canaries}")
    if not 0 < guess_fraction <= 1:
        raise ConfigError(f"--guess-fraction must be in (0, 1], got {guess_fraction}")
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    rng = np.random.default_rng(seed if seed is not None else secrets.randbits(63))
    data = load_task_data(cfg.data, cfg.model.task)
    task = get_task(cfg.model.task)
    canary_examples = _canaries(cfg.model.task, data.train, data.labels, canaries, rng)
    included = rng.random(canaries) < 0.5
    base = load_base(cfg.model, len(data.labels) if data.labels is not None else None)
    model = wrap(base.model, cfg.lora, cfg.model.task, base.target_modules, seed=cfg.train.seed)
    train = data.train + [c for c, keep in zip(canary_examples, included) if keep]
    order = rng.permutation(len(train))
    encoded = task.encode([train[i] for i in order], base.tokenizer, cfg.model.max_length)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(cfg.privacy.ledger or out / "privacy_ledger.json")
    run_id = f"audit-{time.strftime('%Y%m%dT%H%M%S')}"
    delta = privacy_plan(round_spec(cfg), len(encoded)).delta if cfg.privacy.enabled else 1.0 / (10 * len(encoded))
    result = None
    spec = round_spec(cfg)
    for r in range(1, cfg.federation.rounds + 1):
        say(f"training round {r}/{cfg.federation.rounds} on {len(encoded)} records "
            f"({int(included.sum())} of them canaries)")
        # The real records are trained on: the audit is charged to their privacy unit like any training.
        result = train_round(model, encoded, spec, unit=cfg.privacy.unit, ledger=ledger, run_id=run_id, round_idx=r)
    say("scoring the canaries")
    scores = _scores(model, task.encode(canary_examples, base.tokenizer, cfg.model.max_length), cfg.model.task)
    k = max(1, int(round(canaries * guess_fraction / 2)))
    ranked = np.argsort(-scores, kind="stable")
    guess_in, guess_out = ranked[:k], ranked[-k:]
    correct = int(included[guess_in].sum() + (~included[guess_out]).sum())
    claimed = result.epsilon if (result is not None and cfg.privacy.enabled) else None
    return AuditResult(
        canaries=canaries, included=int(included.sum()), guesses=2 * k, correct=correct, confidence=confidence,
        delta=delta, epsilon_lower_bound=epsilon_lower_bound(canaries, 2 * k, correct, delta, confidence),
        claimed_epsilon=claimed, max_bound=epsilon_lower_bound(canaries, 2 * k, 2 * k, delta, confidence),
        seconds=time.perf_counter() - started,
        scores_in=[float(s) for s in scores[included]], scores_out=[float(s) for s in scores[~included]],
    )


def write_audit(result: AuditResult, out: str | Path) -> tuple[Path, Path]:
    """``audit.json`` and ``audit.png`` (canary scores in vs out; claimed ε next to the bound)."""
    import json

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "audit.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = np.histogram_bin_edges(result.scores_in + result.scores_out, bins=30)
    ax_s.hist(result.scores_out, bins=bins, alpha=0.6, label=f"left out ({len(result.scores_out)})")
    ax_s.hist(result.scores_in, bins=bins, alpha=0.6, label=f"trained on ({len(result.scores_in)})")
    ax_s.set(title="Canary scores (minus per-record loss)", xlabel="score", ylabel="canaries")
    ax_s.legend()
    claimed = result.claimed_epsilon
    names = ["claimed ε", f"lower bound\n({result.confidence:.0%})", "largest bound\nthis audit can show"]
    values = [claimed if claimed is not None else 0.0, result.epsilon_lower_bound, result.max_bound]
    bars = ax_e.bar(names, values, color=["tab:blue", "tab:red", "tab:gray"])
    if claimed is None:
        ax_e.text(bars[0].get_x() + bars[0].get_width() / 2, 0.02, "∞\n(not private)", ha="center", va="bottom")
    ax_e.set(title=f"{result.correct}/{result.guesses} guesses right over {result.canaries} canaries", ylabel="ε")
    fig.tight_layout()
    png_path = out / "audit.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path
