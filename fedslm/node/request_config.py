"""Reading a request's run config as untrusted text: bounded in size, YAML without aliases, no
interpolation ever resolved (``${oc.env:…}`` would read the node's environment), then validated like any
config. What the node then takes from it is :mod:`fedslm.node.plan`'s business.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import yaml

from fedslm.config import Config, load_config
from fedslm.errors import ConfigError, FedslmError


class BadRequest(FedslmError):
    """The request cannot be read as a fedslm round (malformed, invalid, or interpolating)."""


def _interpolations(value: Any, path: str = "") -> list[str]:
    if isinstance(value, str):
        return [path or "?"] if "${" in value else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _interpolations(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _interpolations(v, f"{path}[{i}]")]
    return []


# A run config is a few kB; anything past this is not one.
MAX_REQUEST_CONFIG_BYTES = 256 * 1024


class _NoAliases(yaml.SafeLoader):
    """YAML without anchors' aliases: a request has no use for them, and nested aliases (a "billion
    laughs") expand into a structure far larger than the text when the config is walked."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases are not accepted")
        return super().compose_node(parent, index)


def parse_request_config(text: str) -> Config:
    """The request's run config, validated, with no interpolation ever resolved."""
    if not text:
        raise BadRequest("the request carries no fedslm config (run-config 'fedslm-config' missing)")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_REQUEST_CONFIG_BYTES:
        raise BadRequest(f"the request's config is over {MAX_REQUEST_CONFIG_BYTES} bytes")
    return copy.deepcopy(_parsed(text))  # the caller's own copy: a plan may be derived from it in place


# A pure function of the text (a refusal raises, and is not kept). Validating through OmegaConf's structured
# merge takes ~60 ms; a simulation's process is asked every round, by each of its institutions, with the same
# run config (a deployed node's process serves one message: it parses once either way).
@functools.lru_cache(maxsize=8)
def _parsed(text: str) -> Config:
    try:
        content = yaml.load(text, Loader=_NoAliases)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        raise BadRequest("the request's config is not valid YAML") from None
    if not isinstance(content, dict):
        raise BadRequest("the request's config is not a mapping of sections")
    found = _interpolations(content)
    if found:
        raise BadRequest(f"the request's config holds interpolations (at {', '.join(found[:5])}); a node never "
                         "resolves them, since ${oc.env:...} would read this node's environment")
    try:
        return load_config(texts=[text])
    except ConfigError as exc:
        raise BadRequest(f"the request's config is invalid: {exc}") from None
