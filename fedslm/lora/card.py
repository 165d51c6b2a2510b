"""The model card that goes with every adapter: ``adapter/README.md`` (and an export's ``README.md``).

A Hugging Face model card (YAML metadata, then Markdown) that says what the adapter is and what its
privacy guarantee is, read from the run folder only: ``summary.json`` (every figure), ``config.yaml``
(what was asked for) and ``metrics.jsonl`` (rounds of a local run). A figure the run did not measure is
written as "not measured", never estimated. ε and δ in the text are rounded *up* (a card must never
state a stronger guarantee than the run has); the exact values are in the metadata's ``fedslm`` block.

Written by ``fedslm simulate`` and a coordinator's run (end of the ServerApp, then again by simulate
once the fixed test split and per-class scores are in), ``fedslm train`` and ``fedslm export``. The
privacy statement itself is fedslm.lora.card_privacy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from fedslm.lora.card_privacy import NOT_MEASURED, cell, privacy_section, reported

CARD = "README.md"
TAGS = ["federated-learning", "differential-privacy", "lora", "fedslm"]
# Bundled presets: the base's Hugging Face id and licence (a local folder's licence is its own).
BASES = {
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    "gemma3-270m": ("google/gemma-3-270m", "gemma"),
}


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def f3(x: float) -> str:
    return f"{x:.3f}"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _rounds(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rounds = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash: not a finished round
            continue
    return rounds


def worst_class(per_class: dict[str, Any]) -> Optional[tuple[str, float, int]]:
    """(label, accuracy, records) of the class the adapter gets least right, over every institution's
    held-out records pooled (summary.json ``per_class``), or None without per-class counts."""
    labels = per_class.get("labels") or []
    correct = [0] * len(labels)
    total = [0] * len(labels)
    for inst in (per_class.get("per_institution") or {}).values():
        for c, row in enumerate(inst.get("confusion") or []):
            if c < len(labels):
                correct[c] += row[c]
                total[c] += sum(row)
    scored = [(correct[c] / total[c], c) for c in range(len(labels)) if total[c]]
    if not scored:
        return None
    acc, c = min(scored)
    return labels[c], acc, total[c]


def _how_to_load(library: str, task: str) -> list[str]:
    out = ["## How to load", "", "```python"]
    if library == "peft":
        out += ["from fedslm.lora.merge import load_tuned   # checks the base's fingerprint", 'tuned = load_tuned("adapter")']
    elif library == "sentence-transformers":
        out += ["from sentence_transformers import SentenceTransformer",
                'model = SentenceTransformer("EXPORT_DIR")   # encode() gives the logits; labels in labels.json']
    else:
        cls = "AutoModelForCausalLM" if task == "causal_lm" else "AutoModelForSequenceClassification"
        out += [f"from transformers import {cls}", f'model = {cls}.from_pretrained("EXPORT_DIR")']
    return out + ["```", ""]


class _Card:
    def __init__(self, run_dir: Path, meta: dict[str, Any]) -> None:
        self.run = run_dir
        self.summary = _read_json(run_dir / "summary.json")
        self.cfg = _read_yaml(run_dir / "config.yaml")
        # metrics.jsonl is appended to: a folder trained into twice holds both runs' rounds.
        self.metrics = [r for r in _rounds(run_dir / "metrics.jsonl") if r.get("run_id") == self.summary.get("run_id")]
        self.meta = meta
        self.federated = "institutions" in self.summary

    def c(self, section: str, key: str, default: Any = None) -> Any:
        sec = self.cfg.get(section)
        return sec.get(key, default) if isinstance(sec, dict) else default


def build_card(run_dir: str | Path, *, library: str = "peft", simulated: bool = False,
               meta: Optional[dict[str, Any]] = None) -> str:
    """The card of the adapter a run folder holds. ``library``: how the folder it describes loads (peft for
    ``adapter/``, transformers or sentence-transformers for an export). ``simulated``: the run config stood
    for every institution's node policy (``fedslm simulate``), so its accountant is theirs."""
    run = Path(run_dir)
    if meta is None:
        meta = _read_json(run / "adapter" / "fedslm.json")
    k = _Card(run, meta)
    s = k.summary
    task = meta.get("task") or k.c("model", "task") or "classification"
    model = str(meta.get("model") or k.c("model", "name") or "unknown")
    hub, licence = BASES.get(model, (Path(model).name, "other"))
    shown = model if model in BASES else Path(model).name  # a local folder: its name, never the machine's path
    labels = list(meta.get("labels") or [])

    exact: dict[str, Any] = {"run_id": s.get("run_id"), "base_fingerprint": s.get("base_fingerprint")}
    lines: list[str] = []
    add = lines.append
    kind = "federated" if k.federated else "single-institution"
    add(f"# {shown}: {'text classification' if task == 'classification' else 'causal language model'} "
        f"LoRA adapter ({kind}, fedslm)")
    add("")
    add(f"A LoRA adapter for the base model `{shown}`, trained by "
        + (f"{s.get('institutions')} institutions with fedslm (Flower federation, DP-SGD at every institution)."
           if k.federated else "one institution alone on its own records with fedslm (`fedslm train`, DP-SGD)."))
    add("")

    # --- task and labels
    add("## Task and labels")
    add("")
    add(f"- task: `{task}`")
    source = k.c("data", "source")
    # A bundled dataset's name (icd10, icd10-instruct) is public; anything else is a path on some machine.
    if isinstance(source, str) and re.fullmatch(r"[a-z0-9][a-z0-9-]{0,40}", source):
        add(f"- data: the bundled dataset `{source}`")
    else:
        add("- data: the institutions' own records (not named here: they never left their institution)"
            if k.federated else "- data: this institution's own records (not named here)")
    if task == "classification":
        add(f"- labels ({len(labels)}, in the head's index order): "
            + (", ".join(f"`{cell(x)}`" for x in labels) if labels else NOT_MEASURED))
        if meta.get("text_column"):
            add(f"- input: the text column `{cell(meta['text_column'])}`")
    add("")

    # --- privacy
    section, exact_priv = privacy_section(s, k.cfg, k.federated, simulated)
    lines += section
    # --- training
    add("## Training")
    add("")
    if k.federated:
        add(f"- institutions: {s.get('institutions')}")
        add(f"- rounds: {s.get('rounds_completed')} completed of {s.get('rounds_planned')} planned "
            f"(strategy `{s.get('strategy')}`)")
    else:
        add("- institutions: 1 (this one alone)")
        add(f"- rounds: {len(k.metrics) if k.metrics else NOT_MEASURED}; training records: "
            f"{s.get('train_records', NOT_MEASURED)}, held-out records: {s.get('test_records', NOT_MEASURED)}")
    lora = k.cfg.get("lora") or {}
    if isinstance(lora, dict) and lora:
        layers = lora.get("layers")
        add(f"- LoRA: r = {lora.get('r')}, α = {lora.get('alpha')}, "
            + ("the classifier head alone" if layers == 0 else
               "every layer" if layers is None else f"the top {layers} layers")
            + (", FFA-LoRA (A frozen)" if lora.get("ffa") else ""))
    add(f"- base model fingerprint (SHA-256): `{s.get('base_fingerprint', NOT_MEASURED)}`")
    add("")

    # --- evaluation
    add("## Evaluation")
    add("")
    ex_eval: dict[str, Any] = {}
    if task == "classification":
        fixed = s.get("fixed_test") or {}
        if reported(fixed.get("accuracy")) is not None:
            ex_eval["fixed_test"] = fixed
            add(f"- fixed test split ({fixed.get('records')} records never trained on): accuracy "
                f"**{pct(fixed['accuracy'])}**, macro-F1 "
                f"{f3(fixed['macro_f1']) if reported(fixed.get('macro_f1')) is not None else NOT_MEASURED}")
        else:
            add(f"- fixed test split: {NOT_MEASURED}")
        held = s.get("final") if k.federated else s.get("after")
        held = held or {}
        who = "institutions' held-out records, weighted by their size" if k.federated else "held-out records"
        acc, f1 = reported(held.get("accuracy")), reported(held.get("macro_f1"))
        ex_eval["held_out"] = {"accuracy": held.get("accuracy"), "macro_f1": held.get("macro_f1")}
        add(f"- {who}: accuracy {pct(acc) if acc is not None else NOT_MEASURED}, macro-F1 "
            f"{f3(f1) if f1 is not None else NOT_MEASURED}")
    else:
        held = (s.get("final") if k.federated else s.get("after")) or {}
        ppl = reported(held.get("perplexity"))
        ex_eval["held_out"] = {"perplexity": held.get("perplexity")}
        add(f"- held-out perplexity: {f'{ppl:.2f}' if ppl is not None else NOT_MEASURED}")
    before = ((s.get("initial") or {}).get("weighted") if k.federated else s.get("before")) or {}
    b = reported(before.get("accuracy" if task == "classification" else "perplexity"))
    if b is not None:
        ex_eval["before"] = before
        add("- before training, the base with the initial adapter: "
            + (f"accuracy {pct(b)}" if task == "classification" else f"perplexity {b:.2f}") + " on the same records")
    if k.federated:
        worst = s.get("worst_institution") or {}
        headline = "accuracy" if task == "classification" else "perplexity"
        w = reported(worst.get(headline))
        ex_eval["worst_institution"] = worst or None
        if w is not None:
            add(f"- worst institution: {worst.get('institution')}, {headline} "
                f"{pct(w) if headline == 'accuracy' else f'{w:.2f}'} on its own held-out records")
        else:
            add(f"- worst institution: {NOT_MEASURED}")
    if task == "classification":
        wc = worst_class(s.get("per_class") or {})
        if wc is not None:
            ex_eval["worst_class"] = {"label": wc[0], "accuracy": wc[1], "records": wc[2]}
            add(f"- worst class: `{cell(wc[0])}`, accuracy {pct(wc[1])} on {wc[2]} held-out records of all "
                "institutions")
        else:
            add(f"- worst class: {NOT_MEASURED}")
    add("")

    # --- skew
    add("## Skew across institutions")
    add("")
    per_class = s.get("per_class") or {}
    local = (s.get("local_only") or {})
    if per_class.get("per_institution") and task == "classification":
        insts = sorted(per_class["per_institution"], key=lambda x: int(x) if str(x).isdigit() else 0)
        add("Per-class accuracy of this adapter on each institution's own held-out records "
            "(records of the class in brackets; blank: the institution holds none):")
        add("")
        add("| class | " + " | ".join(f"institution {cell(i)}" for i in insts) + " |")
        add("|---|" + "---|" * len(insts))
        for c, label in enumerate(per_class.get("labels") or []):
            cells = []
            for i in insts:
                row = per_class["per_institution"][i]
                accs, counts = row.get("per_class_accuracy") or [], row.get("per_class_records") or []
                a = accs[c] if c < len(accs) else None
                n = counts[c] if c < len(counts) else 0
                cells.append(f"{pct(a)} ({n})" if reported(a) is not None else "")
            add(f"| {cell(label)} | " + " | ".join(cells) + " |")
        add("")
    if local:
        headline = "accuracy" if task == "classification" else "perplexity"
        fed = (s.get("per_institution") or {}).get(headline) or {}
        alone = local.get(headline) or {}
        ex_eval["federated_vs_alone"] = {"federated": fed, "alone": alone}
        add(f"Each institution's held-out {headline}, federated against trained alone under the same ε:")
        add("")
        add("| institution | federated | alone |")
        add("|---|---|---|")
        fmt = pct if headline == "accuracy" else (lambda x: f"{x:.2f}")
        for i in sorted(set(fed) | set(alone), key=lambda x: int(x) if str(x).isdigit() else 0):
            a, b = reported(fed.get(i)), reported(alone.get(i))
            add(f"| {cell(i)} | {fmt(a) if a is not None else NOT_MEASURED} | "
                f"{fmt(b) if b is not None else NOT_MEASURED} |")
        add("")
    if k.federated and not local:
        headline = "accuracy" if task == "classification" else "perplexity"
        fed = (s.get("per_institution") or {}).get(headline) or {}
        shown = [f"{cell(i)}: {pct(x) if headline == 'accuracy' else f'{x:.2f}'}"
                 for i, v in sorted(fed.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
                 if (x := reported(v)) is not None]
        if shown:
            add(f"Held-out {headline} per institution: " + ", ".join(shown) + ".")
            add("")
    if not (per_class.get("per_institution") and task == "classification") and not local:
        add(f"{'Per-class scores: n' if task == 'classification' else 'Each institution trained alone: n'}ot measured "
            "in this run (`fedslm simulate` measures per-class accuracy per institution; "
            "`federation.compare_local: true` adds each institution trained alone).")
        add("")

    # --- use
    add("## Intended use and limits")
    add("")
    add("- Intended for: " + ("labelling records like those it was trained on (the labels above), by the "
                              "institutions that trained it or with their agreement; as a starting point for "
                              "further private fine-tuning." if task == "classification" else
                              "completing prompts in the format it was trained on; research on private "
                              "federated fine-tuning."))
    add("- Not for: decisions about a person without human review; data from another population, coding "
        "system or language than its training data; any use the base model's licence forbids.")
    add("- The figures above were measured on the records named; accuracy differs across institutions and "
        "classes (see the skew), and DP noise costs accuracy, most on rare classes.")
    add("- The guarantee is the one stated above, no more: a larger ε or a δ near 1/n protects little.")
    add("")
    lines += _how_to_load(library, task)

    metadata: dict[str, Any] = {
        "base_model": hub,
        "library_name": library,
        "license": licence,
        "pipeline_tag": "text-classification" if task == "classification" else "text-generation",
        "tags": list(TAGS),
        "fedslm": {**exact, "kind": kind, "simulated": simulated, "privacy": exact_priv, "evaluation": ex_eval,
                   **({"institutions": s.get("institutions"), "rounds_completed": s.get("rounds_completed")}
                      if k.federated else {"institutions": 1, "rounds_completed": len(k.metrics)})},
    }
    head = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=120)
    return "---\n" + head + "---\n\n" + "\n".join(lines)


def read_card_metadata(path: str | Path) -> dict[str, Any]:
    """A card's YAML metadata ({} when there is no card or no metadata)."""
    path = Path(path)
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return {}
    data = yaml.safe_load(text[4:text.index("\n---\n", 4)])
    return data if isinstance(data, dict) else {}


def write_card(run_dir: str | Path, *, simulated: bool = False) -> Path:
    """Write ``run_dir/adapter/README.md`` (replacing PEFT's placeholder card)."""
    run = Path(run_dir)
    path = run / "adapter" / CARD
    path.write_text(build_card(run, simulated=simulated), encoding="utf-8")
    return path


def write_export_card(adapter_dir: str | Path, out: str | Path, library: str) -> Path:
    """The card of an exported folder: rebuilt from the adapter's run folder when it is beside it, else the
    adapter's own card with the library changed, else one that says what is not known."""
    adapter, path = Path(adapter_dir), Path(out) / CARD
    from fedslm.lora.adapter import read_adapter_meta

    meta = read_adapter_meta(adapter)
    if (adapter.parent / "summary.json").is_file():
        # Whether the run config stood for every node's policy is the adapter card's to say (simulate wrote it).
        simulated = bool((read_card_metadata(adapter / CARD).get("fedslm") or {}).get("simulated"))
        text = build_card(adapter.parent, library=library, meta=meta, simulated=simulated)
    elif (card := read_card_metadata(adapter / CARD)).get("fedslm"):
        # The adapter was moved from its run folder: its own card, for the library the export loads with.
        own = (adapter / CARD).read_text(encoding="utf-8")
        body = own[own.index("\n---\n", 4) + 5:].split("## How to load")[0]
        card["library_name"] = library
        text = ("---\n" + yaml.safe_dump(card, sort_keys=False, allow_unicode=True, width=120) + "---\n" + body
                + "\n".join(_how_to_load(library, str(meta.get("task") or "classification"))))
    else:
        model = str(meta.get("model") or "unknown")
        hub, licence = BASES.get(model, (Path(model).name, "other"))
        text = ("---\n" + yaml.safe_dump({"base_model": hub, "library_name": library, "license": licence,
                                          "tags": list(TAGS)}, sort_keys=False, allow_unicode=True)
                + "---\n\n# " + (model if model in BASES else Path(model).name) + " with a fedslm LoRA adapter merged in\n\n"
                "Neither the run folder of this adapter (summary.json) nor its model card was beside it, so its "
                "privacy guarantee and figures are not stated here: read them from the run that trained it.\n")
    path.write_text(text, encoding="utf-8")
    return path
