"""report.png from a run folder's metrics.jsonl and summary.json (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Written by the ServerApp as its very last act, after summary.json, the model card, report.png, report.html
# and the tracker: a simulation need not wait for Flower's own shutdown (Ray, the SuperLink) to know the run
# folder is complete.
FINISHED = ".serverapp-finished"


def read_rounds(folder: Path) -> list[dict[str, Any]]:
    """A run folder's metrics.jsonl, one dict a round; a line being written (torn) is skipped."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    rounds = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rounds.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rounds


def write_report(folder: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder = Path(folder)
    rounds = read_rounds(folder)
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    headline = "accuracy" if any("accuracy" in r["eval_weighted"] for r in rounds) else "perplexity"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_loss, ax_acc), (ax_eps, ax_inst) = axes

    xs = [r["round"] for r in rounds]
    scored = [r for r in rounds if r["eval_weighted"]]  # federation.evaluate_every: not every round is scored
    ax_loss.plot([r["round"] for r in scored], [r["eval_weighted"].get("loss") for r in scored], "o-",
                 label="held-out loss (weighted)")
    insts = sorted({c["institution"] for r in rounds for c in r["clients"]})
    trained = [[c for c in r["clients"] if c.get("train_loss") is not None] for r in rounds]
    # Weighted by the coordinator's weight (a screened, clamped claim), not the reply's own count.
    train_loss = [sum(c["train_loss"] * c.get("weight", c["num_examples"]) for c in cs)
                  / max(1e-12, sum(c.get("weight", c["num_examples"]) for c in cs)) if cs else None for cs in trained]
    ax_loss.plot(xs, train_loss, "s--", label="train loss (weighted)")
    ax_loss.set(title="Loss per round", xlabel="round", ylabel="loss")
    ax_loss.legend()

    ax_acc.plot([r["round"] for r in scored], [r["eval_weighted"].get(headline) for r in scored], "o-", color="black",
                label="all institutions (weighted)")
    for inst in insts:
        ax_acc.plot([r["round"] for r in scored],
                    [next((c["eval"].get(headline) for c in r["clients"] if c["institution"] == inst and "eval" in c),
                          None) for r in scored], ".:", alpha=0.7, label=f"institution {inst}")
    ax_acc.set(title=f"Held-out {headline} per round", xlabel="round", ylabel=headline)
    ax_acc.legend(fontsize=8)

    for inst in insts:
        ax_eps.plot(xs, [next((c.get("epsilon") for c in r["clients"] if c["institution"] == inst), None) for r in rounds],
                    "o-", label=f"institution {inst}")
    ax_eps.set(title="Privacy spent (ε, whole ledger) per institution", xlabel="round", ylabel="ε")
    ax_eps.legend(fontsize=8)

    per = summary.get("per_institution", {}).get(headline, {})
    local = summary.get("local_only", {}).get(headline, {})
    before = summary.get("initial", {}).get("per_institution", {}).get(headline, {})
    labels = sorted(per, key=int)
    pos = list(range(len(labels)))
    series = [(before, "before (round 0)")] if before else []
    series.append((per, "federated"))
    if local:
        series.append((local, "alone, same ε"))
    width = 0.8 / len(series)
    for i, (values, name) in enumerate(series):
        ax_inst.bar([p + (i - (len(series) - 1) / 2) * width for p in pos], [values.get(k) or 0 for k in labels],
                    width, label=name)
    worst = (summary.get("worst_institution") or {}).get("institution")
    ax_inst.set_xticks(pos, [f"{k}{' (worst)' if worst is not None and int(k) == worst else ''}" for k in labels])
    ax_inst.set(title=f"Final {headline} per institution", xlabel="institution", ylabel=headline)
    ax_inst.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc, ax_eps):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"fedslm run {summary.get('run_id', '')}: {summary.get('institutions', len(insts))} institutions, "
                 f"{summary.get('strategy', '')}")
    fig.tight_layout()
    path = folder / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
