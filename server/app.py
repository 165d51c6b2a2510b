"""The fedslm ServerApp: the coordinator. Thin: read the run config, hand the grid to fedslm.

Run config (pyproject [tool.flwr.app.config], or `flwr run --run-config`):
  fedslm-config     a fedslm YAML (absolute, or relative to this app's folder)
  fedslm-overrides  space-separated key=value overrides on top of it
"""

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedslm.config import load_config
from fedslm.coordinator import warmup
from fedslm.coordinator.polling import polling_grid

APP_DIR = Path(__file__).resolve().parent.parent

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = Path(str(context.run_config.get("fedslm-config", "simulations/icd10-hospitals.yaml")))
    if not path.is_absolute():
        path = APP_DIR / path
    overrides = shlex.split(str(context.run_config.get("fedslm-overrides", "")))
    cfg = load_config([path], overrides)
    # Flower's grids sleep a fixed 3 s (deployment) or 0.1 s (simulation) between pulls; poll by backoff.
    grid = polling_grid(grid)
    # A simulation's institutions import their round code while this process imports its own and builds
    # the model (the heavy imports are below, after the warm-up messages are out).
    warming = warmup.start(grid, simulation=grid.simulation)
    from fedslm.coordinator.server import run_server

    run_server(grid, cfg, run_id=str(context.run_id), warming=warming)
