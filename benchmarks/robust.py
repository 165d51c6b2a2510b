"""Robust aggregation against hostile institutions (issue 29): accuracy and pull per strategy.

A small, self-contained federation: a linear softmax classifier on a separable synthetic task (4
classes of Gaussian blobs in 16 dimensions, Dirichlet(1.0) label skew, institution sizes from 100 to
400 records), trained for 20 rounds of 5 local SGD steps. No Flower processes: every round, the
institutions' replies are hand-built Flower Messages handed to fedslm's own Recording strategy
(``make_strategy``), so the screen, the coordinator's weights and Flower's robust strategies are the
code a run uses.

The norm bound. Each local step clips the mean gradient to L2 norm ``clip`` and moves by ``lr`` times
it, so one round's update moves the model by at most ``clip x steps x lr`` (here 1.0 x 5 x 0.2 = 1.0);
the coordinator rejects anything further (``federation.max_update_norm``). Attackers therefore send
updates of exactly that norm (x 0.999), the strongest they can get through the screen:

* ``sign-flip``: minus the update honest training on their own records would send, scaled to the bound;
* ``scaled target``: towards a poisoned model (the global model with its classes rotated by one);
* ``claimed weight``: the sign-flip update with ``num-examples: 10**12``. Robust strategies ignore
  claims; fedavg/fedprox/fedadam clamp them to federation.max_weight_ratio (2) x the round's lower
  median claim. The row "fedavg, claims trusted" is the same round averaged by the raw claims, as the
  coordinator did before issue 29; "fedavg, weighting=equal" ignores claims altogether.

Per (institutions, strategy, attack, attackers): the global model's accuracy on 4,000 held-out
records after the last round, and the pull: the mean over rounds of ||aggregate - honest mean|| / bound,
where the honest mean is the unweighted mean of that round's honest updates (fedadam's server step is
not an average: its pull is not shown).

    python benchmarks/robust.py            # 5, 10 and 20 institutions; about 2 minutes on 1 core
    python benchmarks/robust.py --sizes 10

Writes benchmarks/results/robust.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedslm.config import load_config
from fedslm.coordinator.server import RunRecorder, make_strategy
from fedslm.wire import codec

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES, DIM = 4, 16
ROUNDS, STEPS, LR, CLIP = 20, 5, 0.2, 1.0
BOUND = CLIP * STEPS * LR
STRATEGIES = ["fedavg", "fedprox", "fedadam", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"]
ATTACKS = ["sign-flip", "scaled target", "claimed weight"]
TRUSTED = "fedavg, claims trusted"
EQUAL = "fedavg, weighting=equal"
PROX_MU = 0.01


def make_task(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(CLASSES, DIM))
    means *= 2.0 / np.linalg.norm(means, axis=1, keepdims=True)

    def draw(labels):
        return means[labels] + rng.normal(size=(len(labels), DIM)), labels

    sizes = rng.integers(100, 401, size=n)
    institutions = []
    for size in sizes:
        mix = rng.dirichlet(np.ones(CLASSES))
        institutions.append(draw(rng.choice(CLASSES, size=int(size), p=mix)))
    return institutions, draw(rng.integers(0, CLASSES, size=4000))


def _grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy gradient of the flat model (weights then bias) on (x, y)."""
    W, b = w[:CLASSES * DIM].reshape(CLASSES, DIM), w[CLASSES * DIM:]
    logits = x @ W.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return np.concatenate([(p.T @ x).ravel(), p.sum(axis=0)])


def local_update(w: np.ndarray, x: np.ndarray, y: np.ndarray, rng, mu: float = 0.0) -> np.ndarray:
    start = w.copy()
    for _ in range(STEPS):
        batch = rng.choice(len(y), size=min(64, len(y)), replace=False)
        g = _grad(w, x[batch], y[batch]) + mu * (w - start)
        g *= min(1.0, CLIP / max(np.linalg.norm(g), 1e-12))
        w = w - LR * g
    return w - start


def accuracy(w: np.ndarray, test) -> float:
    x, y = test
    W, b = w[:CLASSES * DIM].reshape(CLASSES, DIM), w[CLASSES * DIM:]
    return float(((x @ W.T + b).argmax(axis=1) == y).mean())


def _state(w: np.ndarray) -> dict[str, torch.Tensor]:
    return {"W": torch.from_numpy(w[:CLASSES * DIM].reshape(CLASSES, DIM).astype(np.float32)),
            "b": torch.from_numpy(w[CLASSES * DIM:].astype(np.float32))}


def _flat(state) -> np.ndarray:
    return np.concatenate([np.asarray(state["W"], np.float64).ravel(), np.asarray(state["b"], np.float64)])


def _reply(node: int, new: np.ndarray, claim: int) -> Message:
    TaskIdentity.node_id = 1
    req = Message(RecordDict({codec.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    TaskIdentity.node_id = node
    return Message(RecordDict({codec.ARRAYS: codec.state_to_record(_state(new)),
                               codec.METRICS: MetricRecord({"num-examples": claim, "unit-weight": 1,
                                                            "institution": node - 2})}), reply_to=req)


def _byzantine(strategy: str, n: int) -> int:
    """The most hostile members each rule is configured to withstand at n institutions (at most 2)."""
    need = {"krum": lambda f: 2 * f + 3, "multi_krum": lambda f: 2 * f + 3, "bulyan": lambda f: 4 * f + 3,
            "median": lambda f: 2 * f + 1, "trimmed_mean": lambda f: f / 0.2}.get(strategy, lambda f: 0)
    return max([f for f in (0, 1, 2) if need(f) <= n] or [0])


def run(strategy: str, n: int, attack: str, attackers: int, task, seed: int = 0) -> dict:
    institutions, test = task
    rng = np.random.default_rng(seed + 1)
    f = _byzantine(strategy, n) if strategy != TRUSTED else 0
    if strategy in ("krum", "multi_krum", "bulyan", "median", "trimmed_mean") and f == 0:
        return {"accuracy": None, "pull": None, "note": f"needs more than {n} institutions"}
    overrides = [f"federation.num_clients={n}", f"federation.min_clients={n}",  # attackers stay inside the screen
                 f"federation.max_update_norm={BOUND}", f"federation.byzantine={max(f, 1)}",
                 "federation.server_lr=0.05", f"federation.proximal_mu={PROX_MU}",
                 f"federation.strategy={'fedavg' if strategy in (TRUSTED, EQUAL) else strategy}"]
    if strategy == EQUAL:
        overrides.append("federation.weighting=equal")
    cfg = load_config([], overrides)
    with tempfile.TemporaryDirectory() as out:
        strat = make_strategy(cfg, RunRecorder(cfg, Path(out), "bench"))
        w = np.zeros(CLASSES * DIM + CLASSES)
        pulls = []
        for rnd in range(1, ROUNDS + 1):
            honest = [local_update(w, x, y, rng, PROX_MU if strategy == "fedprox" else 0.0)
                      for x, y in institutions[attackers:]]
            honest_mean = np.mean(honest, axis=0)
            updates, claims = [], [len(y) for _, y in institutions]
            for i in range(attackers):
                if attack == "scaled target":
                    W = w[:CLASSES * DIM].reshape(CLASSES, DIM)
                    target = np.concatenate([np.roll(W, 1, axis=0).ravel(), np.roll(w[CLASSES * DIM:], 1)])
                    direction = target - w if np.linalg.norm(target - w) > 1e-9 else -honest_mean
                else:  # sign-flip (and claimed weight: the same update with a huge claim)
                    x, y = institutions[i]
                    direction = -local_update(w, x, y, rng)
                updates.append(direction / max(np.linalg.norm(direction), 1e-12) * BOUND * 0.999)
                if attack == "claimed weight":
                    claims[i] = 10**12
            updates += honest
            if strategy == TRUSTED:  # the average by raw claims, as before issue 29
                agg = np.average(np.stack(updates), axis=0, weights=np.asarray(claims, np.float64))
                w = w + agg
            else:
                strat.sent = _state(w)
                strat.current_arrays = {k: v.numpy() for k, v in _state(w).items()}  # as configure_train sets it
                replies = [_reply(i + 2, w + u, int(c)) for i, (u, c) in enumerate(zip(updates, claims))]
                arrays, _ = strat.aggregate_train(rnd, replies)
                new = _flat(codec.record_to_state(arrays)) if arrays is not None else w
                agg = new - w
                w = new
            if strategy != "fedadam":
                pulls.append(float(np.linalg.norm(agg - honest_mean)) / BOUND)
    return {"accuracy": accuracy(w, test), "pull": float(np.mean(pulls)) if pulls else None,
            "byzantine": f if strategy in ("krum", "multi_krum", "bulyan", "median", "trimmed_mean") else None}


def scenarios():
    yield "none", 0
    for attack in ATTACKS:
        for k in (1, 2):
            yield attack, k


def write(results: dict, sizes: list[int], seconds: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "robust.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    cols = [f"{a} ×{k}" if k else "no attacker" for a, k in scenarios()]
    lines = [
        f"Measured {results['date']} on {results['machine']}, {seconds:.0f} s; `python benchmarks/robust.py`.",
        "",
        f"Linear softmax classifier on a separable synthetic task ({CLASSES} classes, {DIM} dimensions, "
        f"Dirichlet(1.0) label skew, 100–400 records per institution), {ROUNDS} rounds × {STEPS} local SGD steps "
        f"(lr {LR}, each step's gradient clipped to {CLIP}), driven through fedslm's Recording strategies with "
        "hand-built Flower replies. Attackers are the first k institutions.",
        "",
        f"**Norm bound from the plan:** clip × steps × lr = {CLIP} × {STEPS} × {LR} = {BOUND:g}: no honest "
        "round can move the model further, so the coordinator rejects any update beyond it "
        "(`federation.max_update_norm`); each attacker sends an update of exactly that norm. (With DP noise "
        "a step also carries noise, which is why fedslm's default bound is a generous multiple of this; set "
        "`federation.max_update_norm` to the plan's figure when you can.)",
        "",
        "Each cell: final held-out accuracy, and in brackets the pull, the mean over rounds of "
        "‖aggregate − mean of the honest updates‖ / bound (0: the attackers moved nothing; fedadam's server "
        "step is not an average, so no pull). `f` is `federation.byzantine` as configured for the rule at "
        "that size (the most ≤ 2 it allows); a rule that needs more institutions than there are is left "
        "blank. fedavg/fedprox/fedadam weigh by claimed records clamped to `federation.max_weight_ratio` "
        f"({results['max_weight_ratio']:g}) × the round's lower median claim; "
        f"\"{TRUSTED}\" averages by the raw claims, as the coordinator did before; \"{EQUAL}\" ignores "
        "claims.",
        "",
    ]
    for n in sizes:
        lines += [f"### {n} institutions", "", "| strategy | f | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for s in [*STRATEGIES, EQUAL, TRUSTED]:
            cells = []
            byz = ""
            for a, k in scenarios():
                r = results["runs"][str(n)][s][f"{a}/{k}"]
                if r["accuracy"] is None:
                    cells.append("—")
                    continue
                byz = str(r.get("byzantine") or "")
                pull = f" ({r['pull']:.2f})" if r["pull"] is not None else ""
                cells.append(f"{r['accuracy']:.3f}{pull}")
            lines.append(f"| {s} | {byz} | " + " | ".join(cells) + " |")
        lines.append("")
    (RESULTS / "robust.md").write_text("\n".join(lines), encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 10 if 10 in sizes else sizes[0]
    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(5 * len(ATTACKS), 4.2), sharey=True)
    names = [*STRATEGIES, EQUAL, TRUSTED]
    xs = np.arange(len(names))
    for ax, attack in zip(axes, ATTACKS):
        for j, k in enumerate((0, 1, 2)):
            key = "none/0" if k == 0 else f"{attack}/{k}"
            vals = [results["runs"][str(n)][s][key]["accuracy"] for s in names]
            ax.bar(xs + (j - 1) * 0.27, [v if v is not None else 0 for v in vals], width=0.27,
                   label=f"{k} attacker{'s' if k != 1 else ''}")
        ax.set_xticks(xs, [s.replace(", claims trusted", "\n(trusted)").replace(", weighting=equal", "\n(equal)")
                           for s in names], rotation=60, fontsize=8)
        ax.set_title(f"{attack}, {n} institutions")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "robust.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20])
    args = ap.parse_args()
    # Each round logs every aggregation (Flower) and every rejected attacker (fedslm): not the point here.
    for name in ("flwr", "fedslm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    # Messages need the process' task identity, as Flower's runtimes set it.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    started = time.perf_counter()
    results = {"date": date.today().isoformat(),
               "machine": f"{platform.machine()}, Python {platform.python_version()}",
               "bound": BOUND, "max_weight_ratio": load_config([], []).federation.max_weight_ratio,
               "rounds": ROUNDS, "steps": STEPS, "lr": LR, "clip": CLIP, "runs": {}}
    for n in args.sizes:
        task = make_task(n)
        per = results["runs"].setdefault(str(n), {})
        for s in [*STRATEGIES, EQUAL, TRUSTED]:
            for attack, k in scenarios():
                r = run(s, n, attack, k, task)
                per.setdefault(s, {})[f"{attack}/{k}"] = r
            row = "  ".join(f"{a[:5]}{k}:{per[s][f'{a}/{k}']['accuracy'] or 0:.2f}" for a, k in scenarios())
            print(f"n={n:2d} {s:24s} {row}", flush=True)
    seconds = time.perf_counter() - started
    write(results, args.sizes, seconds)
    print(f"wrote {RESULTS / 'robust.md'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
