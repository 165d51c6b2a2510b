"""The node's own record of SecAgg+ in its context (what it set up, masked with, verified and signed), and
the policy it checks the coordinator's stages against.

Per run, the last round this node set up and the survivor list it signed are also on disk
(:mod:`fedslm.node.sessions`): they outlive a SuperNode restart, the context does not.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from flwr.app import ConfigRecord, Context, Message

from fedslm.errors import FedslmError


# This node's own record of the protocol in its context: the cohort it shares its secrets with.
STATE = "fedslm-secagg"
COHORT = "cohort"
SESSION = "session"  # "run/group" of the protocol run this node set up last
MASKED_WITH = "masked-with"  # the nodes whose pairwise masks this node added (and itself)
VERIFIED = "verified"  # neighbours whose round keys a listed institution signed
BOUND = "bound"  # "node=institution" for each of them: the only key whose signature counts for that node
SIGNED = "signed"  # the survivor list this node signed in the consistency stage of the session
SETUP_VALUES = "setup-values"  # Flower's setup parameters: clipping range, levels, modulus, max weight
PROTOCOL = "protocol"  # the threshold, share count and cohort size this node accepted at setup
# Under distributed noise (fedslm.privacy.distributed), set when this node trained: its lattice's digest, the
# variance it added, the variance its plan needs in the sum, and the honest contributors it counts on.
NOISE_LATTICE, NOISE_SHARE, NOISE_NEED, NOISE_HONEST = "noise-lattice", "noise-share", "noise-need", "noise-honest"


class SecureAggregationRefused(FedslmError):
    """The coordinator's protocol parameters or stage messages are outside what this node accepts."""


def _full_policy(context: Context) -> Any:
    from fedslm.node.policy import NODE_POLICY, load_policy

    if NODE_POLICY not in context.node_config:
        return None  # simulation: only the protocol's own consistency checks
    return load_policy(str(context.node_config[NODE_POLICY]))


def _policy(context: Context) -> Any:
    full = _full_policy(context)
    return None if full is None else full.secure_aggregation


def _session(msg: Message) -> str:
    return f"{msg.metadata.run_id}/{msg.metadata.group_id}"


def _threshold(own: Optional[Mapping[str, Any]]) -> int:
    """The threshold this node accepted at setup (2, the least, before any setup)."""
    return int(own[PROTOCOL][0]) if own is not None and PROTOCOL in own else 2  # type: ignore[index]


def _own(context: Context) -> dict[str, Any]:
    record = context.state.config_records.get(STATE)
    return dict(record) if record is not None else {}


def setup_values(context: Context) -> Optional[tuple[float, ...]]:
    """Flower's setup parameters this node's mod quantises with (clipping range, levels, modulus, max weight)."""
    values = _own(context).get(SETUP_VALUES)
    return tuple(float(v) for v in values) if values is not None else None  # type: ignore[union-attr]


def record_noise(context: Context, noise: Mapping[str, Any]) -> None:
    """Remember the distributed noise this node added in the round (signed with its survivor list)."""
    if noise:
        context.state.config_records[STATE] = ConfigRecord({**_own(context), NOISE_LATTICE: str(noise["lattice"]),
                                                            NOISE_SHARE: float(noise["share"]),
                                                            NOISE_NEED: float(noise["need"]),
                                                            NOISE_HONEST: int(noise["honest"])})


def cohort(context: Context) -> list[int] | None:
    """The neighbours this node shared its secrets with in the current round (None outside SecAgg+)."""
    record = context.state.config_records.get(STATE)
    return [int(n) for n in record[COHORT]] if record is not None and COHORT in record else None  # type: ignore[union-attr]
