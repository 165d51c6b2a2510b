"""What every ``fedslm`` command shares: the consoles, the one-line handling of user errors, the
config options and the resolved config.

Errors a user can act on (bad config, bad data, a refused budget) print one
line and exit with status 2; nothing else is caught, so real bugs keep their
traceback.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedslm.errors import FedslmError

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedslmError as exc:
            # Escaped: the message quotes file names, column names and values, which are not rich markup.
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file(s), merged in order over the defaults.")
DeviceOpt = typer.Option("auto", "--device", help="Where to run: auto (CUDA, else MPS, else the CPU), cpu, cuda, "
                                                  "cuda:N or mps.")
OverridesArg = typer.Argument(None, help="key=value overrides, e.g. privacy.target_epsilon=3 train.lr=1e-3")


def load_cfg(config: Optional[List[Path]], overrides: Optional[List[str]]):
    """The resolved config: defaults, then the files in order, then the ``key=value`` overrides."""
    from fedslm.config import load_config

    return load_config(config or [], overrides or [])


def fmt_eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3f}"
