"""Where fedslm keeps the caches it may recompute (features, a simulation's partition): one folder, chosen
by $FEDSLM_CACHE_DIR, else ~/.cache/fedslm/features. Its own module so that code which must not import
torch yet (the simulation's data check) can find it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FEDSLM_CACHE_DIR"


def cache_dir() -> Path:
    """Where feature caches live: $FEDSLM_CACHE_DIR, else ~/.cache/fedslm/features."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedslm" / "features"
