"""Generate the docs' configuration and node-policy references from the typed schemas.

    python -m fedslm.docs_ref            # rewrite docs/reference/config.md, policy.md and cli.md
    python -m fedslm.docs_ref --check    # exit 1 if the committed pages differ from what the schemas give

Every key of ``fedslm.config.schema.Config`` and ``fedslm.node.policy.NodePolicy`` gets a row: its
dotted key, its type and default as written in the dataclass, and the comment written above the field
(the schema's comments are its documentation). A key added to a schema without regenerating fails
``tests/test_docs.py``, which names this command.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Any

COMMAND = "python -m fedslm.docs_ref"
ROOT = Path(__file__).resolve().parent.parent
PAGES = {"config": ROOT / "docs" / "reference" / "config.md", "policy": ROOT / "docs" / "reference" / "policy.md",
         "cli": ROOT / "docs" / "reference" / "cli.md"}


# Meanings of the keys whose field has no comment of its own in the schema (from the README's tables). A key
# needs one or the other: tests/test_docs.py fails on a key with neither, and on a gloss whose key is gone.
# Better still, write the comment above the field and drop its line here. {NAME} is the schema's constant.
CONFIG_GLOSS = {
    "model.task": "What the model learns: one of {TASKS}.",
    "model.max_length": "Tokens per record (longer records are truncated).",
    "model.head_prior_scale": "With head_init \"label-names\": the scale of each class's row.",
    "lora.r": "LoRA rank.",
    "lora.alpha": "LoRA scale numerator (the update is scaled by alpha / r).",
    "lora.dropout": "Dropout on LoRA's input while training.",
    "data.text_column": "Classification: the column holding the text (causal LM: plain text).",
    "data.label_column": "Classification: the column holding the label.",
    "data.prompt_column": "Causal LM: the prompt column of prompt/completion pairs.",
    "data.completion_column": "Causal LM: the completion column; the loss is on the completion only.",
    "data.split_seed": "Seed of the train/held-out split (with data.test_fraction).",
    "data.max_test_records": "Score at most this many held-out records (None: all of them).",
    "privacy.enabled": "DP-SGD on or off (off is recorded in the ledger as ε = ∞).",
    "privacy.target_epsilon": "The ε the whole plan (rounds × local steps) reaches; σ is calibrated to it.",
    "privacy.max_grad_norm": "Per-record clipping bound C.",
    "privacy.accountant": "How DP-SGD steps are composed: one of {ACCOUNTANTS} (Opacus' accountants).",
    "privacy.client_level.enabled": "Client-level DP at aggregation, on top of record-level DP.",
    "privacy.client_level.noise_multiplier": "z: the noise std is z × clipping_norm / k for k averaged updates.",
    "privacy.client_level.target_quantile": "With adaptive: the quantile of update norms the bound follows.",
    "privacy.client_level.clip_norm_lr": "With adaptive: how fast the bound moves each round.",
    "train.local_steps": "DP-SGD steps each institution takes per round.",
    "train.lr": "Learning rate of the local optimizer.",
    "train.optimizer": "Local optimizer: one of {OPTIMIZERS}.",
    "train.weight_decay": "Weight decay of the local optimizer.",
    "train.seed": "Seeds the LoRA initialisation (and FFA-LoRA's shared A).",
    "train.eval_batch_size": "Records per evaluation pass.",
    "federation.num_clients": "Institutions (simulated ones in fedslm simulate).",
    "federation.rounds": "Federated rounds; the privacy plan covers all of them.",
    "federation.strategy": "Aggregation, Flower's own: one of {STRATEGIES}.",
    "federation.fraction_evaluate": "Share of institutions sampled for evaluation each round.",
    "federation.evaluate_every": "Institutions score the global adapter every this many rounds, and after the last.",
    "federation.dirichlet_alpha": "With partitioner dirichlet: the concentration over labels (smaller: more skew).",
    "federation.partition_seed": "Seed of the simulated institutions' split.",
    "federation.server_lr": "FedAdam's server learning rate.",
    "output.dir": "The run folder (see the run-folder contract).",
}
POLICY_GLOSS = {
    "data.text_column": "Classification: the column holding the text.",
    "data.label_column": "Classification: the column holding the label.",
    "data.prompt_column": "Causal LM: the prompt column of prompt/completion pairs.",
    "data.completion_column": "Causal LM: the completion column.",
    "data.split_seed": "Seed of the node's fixed train/held-out split (with data.test_fraction).",
    "privacy.max_delta": "δ of the node's guarantee (required): every round is charged at this δ.",
    "privacy.accountant": "How the ledger composes this node's rounds: one of {ACCOUNTANTS}; a request's is ignored.",
    "privacy.max_epsilon_alone": "With assume_honest > 1 (required then): cap on the ε of this node's own noise alone.",
    "evaluation.unit": "The privacy unit evaluations on the held-out records are charged to.",
    "evaluation.epsilon_per_evaluation": "What one evaluation costs the held-out unit.",
    "resources.max_local_steps": "Local steps one round may ask for.",
    "resources.max_lora_rank": "LoRA rank a request may ask for.",
}


def _class_notes(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (annotation as written, the comment lines right above it joined)} from the class' source."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    tree = ast.parse(source)
    node = tree.body[0]
    out: dict[str, tuple[str, str]] = {}
    assert isinstance(node, ast.ClassDef)
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            comment: list[str] = []
            i = stmt.lineno - 2  # the line above, 0-based
            while i >= 0 and lines[i].strip().startswith("#"):
                comment.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            out[stmt.target.id] = (ast.get_source_segment(source, stmt.annotation) or "", " ".join(comment))
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def sections(root: type, prefix: str = "", gloss: dict[str, str] | None = None) -> list[tuple[str, type, list[tuple[str, str, str, str]]]]:
    """[(section key, its class, [(key, type, default, meaning)])], depth first, in field order."""
    notes = _class_notes(root)
    rows: list[tuple[str, str, str, str]] = []
    nested: list[tuple[str, type, list[tuple[str, str, str, str]]]] = []
    for f in dataclasses.fields(root):
        key = f"{prefix}{f.name}"
        value = _default(f)
        annotation, comment = notes.get(f.name, (str(f.type), ""))
        if dataclasses.is_dataclass(value):
            nested.extend(sections(type(value), key + ".", gloss))
            continue
        rows.append((key, annotation, _show(value), comment or (gloss or {}).get(key, "")))
    return ([(prefix.rstrip("."), root, rows)] if rows else []) + nested


def render(root: type, title: str, intro: str, gloss: dict[str, str]) -> str:
    out = [f"# {title}", "", f"<!-- generated by `{COMMAND}` from {root.__module__}.{root.__name__}: "
           "do not edit by hand -->", "", intro, ""]
    consts = {k: ", ".join(f'"{v}"' for v in val) for k, val in vars(sys.modules["fedslm.config.schema"]).items()
              if k.isupper() and isinstance(val, tuple)}
    for name, cls, rows in sections(root, "", {k: v.format(**consts) for k, v in gloss.items()}):
        out.append(f"## `{name}`" if name else "## top level")
        out.append("")
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses invent a signature docstring
            out += [" ".join(doc.split()), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, annotation, default, comment in rows:
            out.append(f"| `{key}` | `{_cell(annotation)}` | {_cell(default)} | {_cell(comment)} |")
        out.append("")
    return "\n".join(out)


def render_cli() -> str:
    """Every ``fedslm`` command with its arguments and options, from the typer app itself."""
    import click
    import typer.main

    from fedslm.cli.main import app

    out = ["# Commands", "", f"<!-- generated by `{COMMAND}` from fedslm.cli.main: do not edit by hand -->", "",
           "Every `fedslm` command, its arguments and options, as `fedslm COMMAND --help` prints them. "
           "Configuration keys (`key=value` overrides): [Configuration](config.md); node policy keys: "
           "[Node policy](policy.md).", ""]

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            if len(path) > 1 and cmd.help:
                out.extend([f"## `{' '.join(path)}`", "", " ".join(cmd.help.split()), ""])
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])
            return
        out.extend([f"## `{' '.join(path)}`", ""])
        if cmd.help:
            out.extend([inspect.cleandoc(cmd.help).replace("\b\n", ""), ""])
        rows = []
        for p in cmd.params:
            if p.hidden if isinstance(p, click.Option) else False:
                continue
            name = ", ".join(f"`{o}`" for o in p.opts) if isinstance(p, click.Option) else f"`{p.name.upper()}`"
            default = "(required)" if p.required else ("" if p.default is None or callable(p.default) else _show(p.default))
            if isinstance(p, click.Argument) and p.nargs == -1:
                name += " …"
            rows.append(f"| {name} | `{_cell(p.type.name)}` | {_cell(default)} | "
                        f"{_cell(' '.join((getattr(p, 'help', None) or '').split()))} |")
        if rows:
            out.extend(["| argument / option | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        elif not cmd.params and cmd.context_settings.get("ignore_unknown_options"):
            out.extend(["Takes the arguments of the Flower command it wraps.", ""])

    walk(typer.main.get_command(app), ["fedslm"])
    return "\n".join(out)


def pages() -> dict[str, str]:
    from fedslm.config.schema import Config
    from fedslm.node.policy import NodePolicy

    return {
        "config": render(Config, "Configuration reference",
                         "Every key of a run config (`fedslm simulate`, `fedslm train`, the coordinator's run), from "
                         "the typed schema `fedslm/config/schema.py`. Set them in YAML files (`--config`, merged in "
                         "order) or as `key=value` overrides; an unknown key or a bad value stops with one line "
                         "naming the key and what is allowed. In deployment the run config is only a *request*: "
                         "see the [node policy](policy.md) for what each institution decides itself.",
                         CONFIG_GLOSS),
        "policy": render(NodePolicy, "Node policy reference",
                         "Every key of an institution's node policy (`fedslm node init` writes a commented "
                         "template, `fedslm node check` validates it), from `fedslm/node/policy.py`. The policy "
                         "never leaves the institution's machine and wins over any request from the coordinator.",
                         POLICY_GLOSS),
        "cli": render_cli(),
    }


def undocumented() -> list[str]:
    """Keys with neither a comment in their schema nor a gloss here, and glosses of keys that are gone."""
    from fedslm.config.schema import Config
    from fedslm.node.policy import NodePolicy

    problems = []
    for root, gloss, where in ((Config, CONFIG_GLOSS, "fedslm/config/schema.py"),
                               (NodePolicy, POLICY_GLOSS, "fedslm/node/policy.py")):
        keys = set()
        for _, _, rows in sections(root, "", gloss):
            for key, _, _, meaning in rows:
                keys.add(key)
                if not meaning:
                    problems.append(f"{key} ({where}) has no comment above its field")
        problems += [f"fedslm/docs_ref.py glosses {key}, which {where} no longer has" for key in gloss if key not in keys]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed pages, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, text in pages().items():
        path = PAGES[name]
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    problems = undocumented()
    for problem in problems:
        print(f"undocumented: {problem}", file=sys.stderr)
    if stale:
        print(f"out of date: {', '.join(stale)}; regenerate with: {COMMAND}", file=sys.stderr)
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
