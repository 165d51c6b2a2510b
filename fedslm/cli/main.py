"""The ``fedslm`` command line: the app, with each command group in a module of its own
(:mod:`fedslm.cli.node`, :mod:`fedslm.cli.privacy`, :mod:`fedslm.cli.run`, :mod:`fedslm.cli.tools`;
what they share, the one-line handling of user errors among it, in :mod:`fedslm.cli.common`).
"""

from __future__ import annotations

import sys

import typer

from fedslm.cli import run, tools
from fedslm.cli.node import node_app
from fedslm.cli.privacy import ledger_app, privacy_app
from fedslm.cli.tools import cache_app, config_app, model_app

app = typer.Typer(
    name="fedslm",
    help="Federated, differentially private LoRA fine-tuning of small language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# In this order (the help and docs/reference/cli.md list them so).
for _name, _command in (("train", run.train_cmd), ("simulate", run.simulate_cmd), ("certs", tools.certs_cmd),
                        ("audit", run.audit_cmd), ("generate", run.generate_cmd), ("predict", run.predict_cmd),
                        ("report", run.report_cmd), ("export", run.export_cmd)):
    app.command(_name)(_command)
app.add_typer(privacy_app, name="privacy")
app.add_typer(ledger_app, name="ledger")
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(node_app, name="node")
app.add_typer(cache_app, name="cache")


# Commands whose process ends by os._exit once they succeeded: a finished `fedslm simulate` has written and
# closed every file, and the interpreter's teardown with torch, transformers and PEFT loaded takes 1.3-1.5 s
# of the command's wall time (measured on 2 cores) for nothing.
EXIT_WITHOUT_TEARDOWN = frozenset({"simulate"})


def main() -> None:
    """The console script: ``app`` with the interpreter's teardown skipped after a successful command of
    EXIT_WITHOUT_TEARDOWN (its output flushed and logging shut down first)."""
    try:
        app()
    except SystemExit as exc:
        if exc.code in (0, None) and sys.argv[1:2] and sys.argv[1] in EXIT_WITHOUT_TEARDOWN:
            import logging
            import os

            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            logging.shutdown()
            os._exit(0)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
