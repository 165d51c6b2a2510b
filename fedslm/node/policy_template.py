"""The commented node policy ``fedslm node init`` writes: every key of :class:`fedslm.node.policy.NodePolicy`
with its default and what it decides, filled in with the institution's name, records, ledger and label set.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import yaml

TEMPLATE = """\
# fedslm node policy: what this institution decides for itself, whatever a coordinator asks.
# Read only on this machine. Name it in the SuperNode's node config:
#   flower-supernode ... --node-config 'policy="{path}"'
# Check it with: fedslm node check {path}

# This institution's name in its own logs and files (never sent).
name: {name}

data:
  # Your records: a .csv or .jsonl file with a text and a label column (classification), or a
  # prompt and a completion column (causal LM).
  source: {source}
  text_column: text
  label_column: label
  # The label set the federation agreed on, in index order (classification). A request with another
  # label set is refused; a record with a label outside it stops the node (fix the data).
  labels:{labels}
  # Your fixed split: this share of the records is held out for evaluation, by this seed.
  # A coordinator cannot change it.
  test_fraction: 0.1
  split_seed: 0
  # Never score fewer held-out records than this, whatever a request asks.
  min_test_records: 50
  # Whether the number of training records may be sent, with what reveals it (sample rate, σ, the
  # ε spent). false: all withheld, FedAvg counts you as 1; `fedslm ledger show` still has your ε.
  size_is_public: false
  # With the size private, a public lower bound on your training records: the DP noise is planned for
  # it, so the noise level in your updates does not give your count away (a floor well below the
  # count costs utility: more noise). node init proposes your count rounded down to two digits; left
  # null, the node plans for the largest power of two at or below the count (coarser, more noise).
  size_floor: {size_floor}

privacy:
  # The privacy unit the ledger charges: one name for the people whose records these are.
  # Every round on them is charged to it, whatever split, subset or order is used. A second,
  # disjoint dataset (other people) runs under its own SuperNode and policy, with its own unit.
  unit: all-records
  # The ledger: keep it forever and back it up; a lost ledger must never look like a fresh budget.
  ledger: {ledger}
  # This node's guarantee: at most max_epsilon in total, over every round and run, at δ = max_delta.
  # Both are required. δ must stay below 1/n for n training records (1/(10 n) is common).
  max_epsilon: 8.0
  max_delta: 1.0e-6
  # rdp or prv: how the ledger composes every round (prv is tighter; both are upper bounds).
  accountant: rdp
  # A round with no DP at all (ε = ∞) is refused unless this is true.
  allow_non_private: false
  # Draw DP noise and Poisson sampling from the OS CSPRNG, whatever the request says. Keep it on:
  # torch's generator takes a 32-bit seed, which a coordinator could search to subtract the noise.
  require_secure_noise: true
  # Send an update only inside secure aggregation (SecAgg+).
  require_secure_aggregation: false
  # Distributed noise (a run's federation.secagg.distributed_noise): how many contributors to the secure
  # sum, you included, you count on to add their share of the DP noise. 1 trusts no one (you add it all).
  # With k > 1 you add 1/k, set max_epsilon_alone (the ε of your own noise alone, should the others add
  # none), your identity_key, the others' keys in peers and min_cohort >= k under secure_aggregation.
  assume_honest: 1
  # max_epsilon_alone: 25.0

models:
  # Base models this node may load: bundled presets (fedslm model list) or local model folders.
  allowed: [minilm]
  # Optionally pin the exact base (with its task head) by fingerprint (fedslm node check prints it).
  # fingerprints: [...]

evaluation:
  # Scoring the coordinator's model on your held-out records is a DP release too: they are a privacy
  # unit of their own, with this budget. Each evaluation costs epsilon_per_evaluation and releases
  # the noised record count and the metrics listed (at 400 held-out records and ε = 1 per
  # evaluation, accuracy carries noise of about ±2 points; ten evaluations compose to ε ≈ 3.5).
  unit: held-out
  max_epsilon: 10.0
  epsilon_per_evaluation: 1.0
  release: [accuracy, loss]
  loss_cap: 10.0

secure_aggregation:
  # Mask this node's update only in a round of at least this many institutions and neighbours, and
  # only if at least min_threshold (and more than half) of its shares are needed to rebuild a secret.
  min_cohort: 3
  min_threshold: 2
  # Without identities a coordinator can fill this node's cohort with neighbours it made up and unmask
  # its update alone. Make this institution's key with `fedslm node keygen`, send its .pub to the others
  # out of band, and list theirs here (paths relative to this file). Then every neighbour must prove it
  # is a listed institution, up to max_unverified_share of them, and a round is unmasked only when more
  # than half of the listed institutions signed its survivor list (list the federation's, not more).
  identity_key: null
  peers: {{}}  # e.g. {{hospital-b: keys/hospital-b.pub, hospital-c: keys/hospital-c.pub}}
  max_unverified_share: 0.0
  # Institutions you guard against colluding with the coordinator (a colluder signs every survivor
  # list): rounds then need 2 x threshold > shares + max_colluding. 0 assumes they do not collude.
  max_colluding: 0

resources:
  # What one request may make this node hold in memory: training chunks and evaluation batches are cut
  # to these sizes (the result is the same), and a longer model.max_length is refused.
  max_physical_batch_size: 128
  # ... chunks of cached sentence vectors when only the head trains (lora.layers: 0; no model pass).
  max_feature_batch_size: 65536
  max_eval_batch_size: 512
  max_length: 256
  # Where this node trains and scores: auto (an accelerator if torch sees one, else the CPU), cpu, cuda,
  # cuda:N or mps. A coordinator's request never chooses it; `fedslm node check` shows what it resolves to.
  device: auto
  # The most work one request may ask of this node; a request past any of these is refused before
  # anything is planned or charged to the ledger.
  max_rounds_per_run: 1000
  max_local_steps: 10000
  max_lora_rank: 64
  # Memory one round may plan to use (GiB), and the wall time of one round's training (seconds).
  max_memory_gb: 16.0
  max_seconds_per_round: 3600.0

# torch threads for training on this node (null: torch's default).
threads: null
"""


def proposed_floor(n: int) -> int:
    """``n`` rounded down to two significant digits (8,734 -> 8,700): what node init proposes as data.size_floor."""
    if n < 100:
        return max(n, 1)
    unit = 10 ** (len(str(n)) - 2)
    return n // unit * unit


def template(path: str | Path, name: str = "my-hospital", source: str = "/data/records.csv",
             ledger: Optional[str] = None, labels: Optional[List[str]] = None,
             size_floor: Optional[int] = None) -> str:
    path = Path(path).resolve()
    # Absolute paths: load_policy refuses relative ones (they would depend on the folder the node starts in).
    ledger = str(Path(ledger).expanduser().resolve()) if ledger else str(path.with_name(path.stem + ".ledger.json"))
    from fedslm.data import bundled

    if bundled.get(source) is None:
        source = str(Path(source).expanduser().resolve())
    def scalar(value: str) -> str:  # quoted where YAML needs it (a '#' or ': ' in a path would cut it short)
        return yaml.safe_dump(value, default_style=None, width=10**6).strip().removesuffix("...").strip()

    if labels:
        shown = "\n" + "".join(f"    - {scalar(label)}\n" for label in labels).rstrip("\n")
    else:
        shown = " null"
    return TEMPLATE.format(path=path, name=scalar(name), source=scalar(source), ledger=scalar(ledger), labels=shown,
                           size_floor="null" if size_floor is None else size_floor)
