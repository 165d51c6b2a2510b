"""What `fedslm simulate` checks and prepares before Flower starts: the GPU share Ray is asked for, the
scenario's data (read, validated and partitioned, so a bad file is refused in one line within seconds),
and the one shared feature pass every simulated institution then reads (fedslm.train.feature_pool)."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
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
    leaves it unset: the ServerApp is the coordinator, which holds no data to learn it from.

    The split is kept on the returned data (``whole.partitions``) for :func:`share_partitions`. A split
    saved by an earlier simulation of the same records under the same settings (the file is named by the
    dataset's fingerprint and those settings) is read instead of splitting again: splitting imports
    flwr-datasets and its dependencies, seconds of every warm run."""
    from fedslm.cachedir import cache_dir
    from fedslm.data import load_task_data
    from fedslm.data.partition import load_partitions, partitions_file

    fed = cfg.federation
    whole = load_task_data(cfg.data, cfg.model.task,
                           group_column=fed.partition_column if fed.partitioner == "column" else None)
    if cfg.model.task == "classification" and cfg.data.labels is None:
        cfg.data.labels = list(whole.labels)
    whole.partitions = None if fed.ray_address else load_partitions(
        partitions_file(cache_dir(), whole.dataset_id, fed), len(whole.train), fed)
    if whole.partitions is None:
        whole.partitions = split(whole, fed)
    return whole


def split(whole: Any, fed: Any) -> list:
    """flwr-datasets' partition of the scenario's training records, refused naming the keys when impossible."""
    from fedslm.data.partition import partition_indices

    try:
        # Dirichlet's retries warn once per try; here only the outcome matters.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return partition_indices(whole.train, fed)
    except ValueError as exc:  # flwr-datasets' partitioners (e.g. Dirichlet's size retries running out)
        raise ConfigError(f"federation.partitioner={fed.partitioner} cannot split the {len(whole.train)} training "
                          f"records into federation.num_clients={fed.num_clients} institutions: {exc}") from None


def share_partitions(cfg: Config, whole: Any) -> None:
    """The scenario's partition into institutions (check_data's), written where its ClientApps look first
    (fedslm.data.partition.partitions_file, in the feature cache folder): each Ray actor then reads it
    instead of importing flwr-datasets and splitting again. Not on a Ray cluster (other machines)."""
    if cfg.federation.ray_address:
        return
    from fedslm.cachedir import cache_dir
    from fedslm.data.partition import partitions_file, save_partitions

    parts = whole.partitions if whole.partitions is not None else split(whole, cfg.federation)
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
    caches nothing this way (other depths, causal models: each node computes its own, as deployed).

    A pool this function computed or checked for the same records, base files and layout before is not
    checked again (:func:`_pool_known`): checking means loading the base and tokenizing every record,
    seconds of every warm run. That memo is only a shortcut for this process: each institution still looks
    its records up in the pool by their token ids and computes what it does not find."""
    if cfg.lora.layers != 0 or cfg.model.task != "classification" or cfg.federation.ray_address:
        return None  # on a Ray cluster the institutions run on other machines, with caches of their own
    from fedslm.cachedir import cache_dir

    memo = cache_dir() / POOL_MEMO
    signature = _pool_signature(cfg, whole)
    count = _pool_known(memo, signature)
    if count is not None:
        return count
    from fedslm.data.tasks import get_task
    from fedslm.lora import wrap
    from fedslm.models import load_base
    from fedslm.train import prefix
    from fedslm.train.feature_pool import pool_key, warm_pool

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
    layout = prefix.layout_of(cfg.model, next(model.parameters()).device)
    pool = cache_dir() / f"{pool_key(base.fingerprint, layout, encs[0].pad_id)}.pt"
    _remember_pool(memo, signature, pool, count)
    return count


# In the feature cache folder: the last pool warm_features computed or checked, and for which records.
POOL_MEMO = "pool-memo.json"


def _pool_signature(cfg: Config, whole: Any) -> dict[str, Any]:
    """What the pool's rows depend on, without loading the base: the base's files (name, size, mtime), the
    layout (pooling, normalisation, max length) and every record of the train and test splits."""
    from fedslm.data.examples import dataset_fingerprint

    files = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in _base_files(cfg)]
    m = cfg.model
    from fedslm import cpu

    # model.feature_precision as resolved where the pool is computed (a GPU's bf16 is looked at there).
    precision = [m.feature_precision, "gpu" if float(cfg.federation.client_gpus) > 0 else cpu.has_native_bf16()]
    return {"memo": 1, "files": files, "layout": [m.name, m.pooling, m.normalize, m.max_length, precision],
            "train": whole.dataset_id, "test": dataset_fingerprint(whole.source, whole.test)}


def _base_files(cfg: Config) -> list[Path]:
    from fedslm.models.load import resolve_model_path

    folder, _ = resolve_model_path(cfg.model)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _pool_known(memo: Path, signature: dict[str, Any]) -> Optional[int]:
    """The record count of the pool ``memo`` names when it was written for ``signature`` and the pool file is
    the one it was written with (same inode and size: prefix._write_tensors replaces a pool whole, by a
    rename; its mtime is no witness, every lookup touches it)."""
    import json
    import os

    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
        name = str(data["pool"])
        if Path(name).name != name or not name.endswith(".pt"):  # only a pool file of this folder, by name
            return None
        pool = memo.parent / name
        st = pool.stat()
        if data["signature"] != json.loads(json.dumps(signature)) or data["stat"] != [st.st_ino, st.st_size]:
            return None
        os.utime(pool)  # in use: the newest for the folder's pruning, as warm_pool does
        return int(data["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember_pool(memo: Path, signature: dict[str, Any], pool: Path, count: int) -> None:
    import json
    import os

    try:
        st = pool.stat()
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"signature": signature, "pool": pool.name, "count": count,
                                   "stat": [st.st_ino, st.st_size]}), encoding="utf-8")
        os.replace(tmp, memo)
    except OSError as exc:  # the next run checks the pool again
        log.warning("could not remember the feature pool (%s)", exc)
