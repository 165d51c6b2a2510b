"""What a node's error reply may say: one of a few categories, each with a fixed reason.

A reply never carries a value, a path, a column name or an environment variable from the node:
the coordinator learns *that* a node refused and in which category, which is a public fact about
the protocol; the details go to the node's own log, where its operator reads them.
"""

from __future__ import annotations

from typing import Optional

# The code every node refusal carries (Flower's own codes are below 1000).
NODE_REFUSED = 1001

CATEGORIES: dict[str, str] = {
    "bad-request": "the request could not be read as a fedslm round",
    "refused-by-policy": "the request asks for something this node's policy does not allow",
    "budget-exhausted": "this round would pass this node's privacy budget",
    "base-mismatch": "this node's base model or frozen adapter differs from the coordinator's",
    "node-misconfigured": "this node is not set up to serve this round; its operator must fix its policy or data",
    "secure-aggregation": "the secure aggregation protocol failed or was refused on this node",
    "internal": "this node failed while serving the round",
}


def public_reason(category: str) -> str:
    """The whole text of an error reply in ``category`` (an unknown one is reported as internal)."""
    category = category if category in CATEGORIES else "internal"
    return f"node refused [{category}]: {CATEGORIES[category]} (details in the node's own log)"


def category_of(reason: Optional[str]) -> Optional[str]:
    """The category a node's error reason names, if it is one of ours."""
    if reason and reason.startswith("node refused ["):
        cat = reason[len("node refused ["):].split("]", 1)[0]
        return cat if cat in CATEGORIES else None
    return None
