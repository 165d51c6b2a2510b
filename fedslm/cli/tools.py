"""Housekeeping commands: the resolved config, the bundled base models, the feature cache, and the
deployment's credentials (``fedslm certs``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fedslm.cli.common import ConfigOpt, OverridesArg, console, err_console, load_cfg, user_errors
from fedslm.errors import ConfigError

config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
model_app = typer.Typer(help="Bundled base models.", no_args_is_help=True)
cache_app = typer.Typer(help="The frozen-prefix feature cache (features of private records: 0600 files).",
                        no_args_is_help=True)


@config_app.command("show")
@user_errors
def config_show(config: Optional[List[Path]] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Print the resolved config (defaults + files + overrides) as YAML."""
    from fedslm.config import to_yaml

    console.print(to_yaml(load_cfg(config, overrides)), markup=False, highlight=False)


@model_app.command("prepare")
@user_errors
def model_prepare(name: str = typer.Argument(..., help="A bundled preset, e.g. gemma3-270m or minilm.")) -> None:
    """Make a bundled model ready offline (gemma3-270m: dequantize its GGUF into the cache, once)."""
    from fedslm.models import presets

    preset = presets.get(name)
    if preset is None:
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(presets.names())}")
    with err_console.status(f"preparing {name}"):
        path = preset.locate()
    console.print(f"{name}: {path}")


@model_app.command("list")
def model_list() -> None:
    """The bundled model presets."""
    from fedslm.models import presets

    for name in presets.names():
        p = presets.get(name)
        console.print(f"{name:<13} {', '.join(p.tasks):<15} {p.description}")


def _cache_folder(folder: Optional[Path]) -> Path:
    from fedslm.train.prefix import cache_dir

    return folder.expanduser() if folder is not None else cache_dir()


CacheDirOpt = typer.Option(None, "--dir", help="The cache folder (default: $FEDSLM_CACHE_DIR, else "
                                               "~/.cache/fedslm/features).")


@cache_app.command("show")
@user_errors
def cache_show(folder: Optional[Path] = CacheDirOpt) -> None:
    """List the cache's files (newest first), their sizes and total against the budget."""
    import datetime

    from fedslm.train.prefix import MAX_BYTES_ENV, MAX_FILES, cache_files, max_limit

    where = _cache_folder(folder)
    files = cache_files(where)
    for f, size, mtime in files:
        when = datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
        console.print(f"{f.name[:16]}…  {size / 2**20:9.1f} MiB  {when}")
    total = sum(size for _, size, _ in files)
    console.print(f"{where}: {len(files)} file(s), {total / 2**20:.1f} MiB of {max_limit() / 2**20:.0f} MiB "
                  f"({MAX_BYTES_ENV}) and at most {MAX_FILES} files; the oldest go first")


@cache_app.command("purge")
@user_errors
def cache_purge(folder: Optional[Path] = CacheDirOpt) -> None:
    """Delete every feature-cache file (they are rebuilt from the records on the next round)."""
    from fedslm.train.prefix import prune

    where = _cache_folder(folder)
    gone = prune(where, max_bytes=-1)
    console.print(f"{where}: deleted {len(gone)} file(s), "
                  f"{'nothing left' if not gone else 'the cache is rebuilt from the records when next needed'}")


@user_errors
def certs_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the credentials (must not hold any yet)."),
    superlink_host: List[str] = typer.Option(..., "--superlink-host", help="Address or host name institutions use "
                                             "to reach the SuperLink; repeat for several (all go in the SAN)."),
    institution: Optional[List[str]] = typer.Option(None, "--institution", "-i", help="Institution name; repeat."),
    days: int = typer.Option(365, "--days", help="Validity of the certificates."),
) -> None:
    """Create a CA, the SuperLink's TLS certificate and one SuperNode key pair per institution."""
    from fedslm.deploy.certs import make_credentials

    creds = make_credentials(out, superlink_host, institution or [], days)
    console.print(f"CA certificate       {creds.ca_cert}  (give to every institution)")
    console.print(f"SuperLink TLS        {creds.superlink_cert}, {creds.superlink_key}  (coordinator only)")
    for name, (priv, pub) in creds.institutions.items():
        console.print(f"institution {name:<9}{priv} (private, stays on its node), {pub}")
    console.print(f"public keys to enrol {creds.enrolled}  (flwr supernode register <name>/auth_key.pub)")
