"""What `fedslm simulate` checks and prepares before Flower starts: the GPU share Ray is asked for, the
scenario's data (read, validated and partitioned, so a bad file is refused in one line within seconds),
and the one shared feature pass every simulated institution then reads (fedslm.train.feature_pool)."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any, Optional

from rich.console import Console

from fedslm.config import Config
from fedslm.errors import ConfigError

log = logging.getLogger(__name__)


def check_client_gpus(cfg: Config) -> int:
    """GPUs of this machine that federation.client_gpus may use (0 when it is 0), refused naming the key when
    Ray could not schedule it here: a share of a GPU on a machine torch sees none on, more than it has,
    or a share above one GPU that is not a whole number (Ray's rule). On a cluster (ray_address) the
    GPUs are the cluster's, which this machine cannot count."""
    want = float(cfg.federation.client_gpus)
    if want <= 0:
        return 0
    if want > 1 and not want.is_integer():
        raise ConfigError(f"federation.client_gpus must be a fraction of one GPU (e.g. 0.25) or a whole number of "
                          f"GPUs, got {want:g}")
    if cfg.federation.ray_address:
        return 0
    import torch

    from fedslm.train.device import torch_sees

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"federation.client_gpus={want:g} asks for GPUs, but torch sees {torch_sees()}; set "
                          "federation.client_gpus=0 to simulate on the CPU")
    if want > count:
        raise ConfigError(f"federation.client_gpus={want:g} is more than the {count} GPU(s) this machine has: no "
                          "institution could be scheduled")
    return count


def check_data(cfg: Config) -> Any:
    """Read, validate and split the scenario's data as the simulated institutions will, before Flower and
    Ray start: a bad file is refused here in one line within seconds. Inside Flower it fails every
    ClientApp (or the ServerApp) and the run ends ~40 s later with an exit code, the reason in flower.log.

    A classification run's label set goes into the run config (``data.labels``) here when the scenario
    leaves it unset: the ServerApp is the coordinator, which holds no data to learn it from."""
    from fedslm.data import load_task_data
    from fedslm.data.partition import partition_indices

    fed = cfg.federation
    whole = load_task_data(cfg.data, cfg.model.task,
                           group_column=fed.partition_column if fed.partitioner == "column" else None)
    if cfg.model.task == "classification" and cfg.data.labels is None:
        cfg.data.labels = list(whole.labels)
    try:
        # Dirichlet's retries warn once per try; here only the outcome matters (the ClientApps split again).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            partition_indices(whole.train, fed)
    except ValueError as exc:  # flwr-datasets' partitioners (e.g. Dirichlet's size retries running out)
        raise ConfigError(f"federation.partitioner={fed.partitioner} cannot split the {len(whole.train)} training "
                          f"records into federation.num_clients={fed.num_clients} institutions: {exc}") from None
    return whole


def share_partitions(cfg: Config, whole: Any) -> None:
    """The scenario's partition into institutions, written where its ClientApps look first
    (fedslm.data.partition.partitions_file, in the feature cache folder): each Ray actor then reads it
    instead of importing flwr-datasets and splitting again. Not on a Ray cluster (other machines)."""
    if cfg.federation.ray_address:
        return
    from fedslm.data.partition import partition_indices, partitions_file, save_partitions
    from fedslm.train.prefix import cache_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Dirichlet's retries (check_data split the same way)
        parts = partition_indices(whole.train, cfg.federation)
    try:
        save_partitions(partitions_file(cache_dir(), whole.dataset_id, cfg.federation), parts)
    except OSError as exc:  # the ClientApps then split themselves
        log.warning("could not write the partition file (%s)", exc)


def warm_features(cfg: Config, whole: Any, console: Optional[Console] = None) -> Optional[int]:
    """One feature pass for the whole simulation (lora.layers: 0, the head-only recipe): the base is public
    and every institution's records are on this machine, so the sentence vectors of all the scenario's
    records (every institution's train and held-out share, and the fixed test split) are computed once,
    here, batched by length on all cores, into the shared pool file of fedslm.train.feature_pool. Each
    simulated institution then takes its rows from it instead of running the base over its own records
    in its own Ray actor. Returns the number of distinct records computed, or None when the recipe
    caches nothing this way (other depths, causal models: each node computes its own, as deployed)."""
    if cfg.lora.layers != 0 or cfg.model.task != "classification" or cfg.federation.ray_address:
        return None  # on a Ray cluster the institutions run on other machines, with caches of their own
    from fedslm.data.tasks import get_task
    from fedslm.lora import wrap
    from fedslm.models import load_base
    from fedslm.train import prefix
    from fedslm.train.feature_pool import warm_pool

    base = load_base(cfg.model, len(whole.labels) if whole.labels is not None else None)
    import torch

    # Where the institutions would compute it: a GPU when they get shares of one (check_client_gpus passed).
    device = torch.device("cuda") if float(cfg.federation.client_gpus) > 0 else None
    model = wrap(base.model, cfg.lora, cfg.model.task, base.target_modules, seed=cfg.train.seed, device=device)
    task = get_task(cfg.model.task)
    encs = [task.encode(whole.train, base.tokenizer, cfg.model.max_length),
            task.encode(whole.test, base.tokenizer, cfg.model.max_length)]
    if prefix.estimated_bytes(model, encs[0], 0) + prefix.estimated_bytes(model, encs[1], 0) > prefix.max_limit():
        return None  # the nodes will train uncached as well (split_features' limit)
    started = time.monotonic()
    status = console.status(f"frozen-prefix features of {len(encs[0]) + len(encs[1])} records (one pass for all "
                            "institutions)") if console is not None else contextlib.nullcontext()
    with status:
        count = warm_pool(model, encs, base.fingerprint, cfg.model)
    if console is not None:
        console.print(f"features of {count} records in {time.monotonic() - started:.0f}s (one pass, shared by "
                      f"the {cfg.federation.num_clients} institutions)")
    return count
