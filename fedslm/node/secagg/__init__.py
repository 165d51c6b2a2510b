"""The node's side of SecAgg+: Flower's ``secaggplus_mod`` around fedslm's train handler.

See :mod:`fedslm.wire.secagg` for the protocol and what fedslm changes in it. By concept:

* :mod:`~fedslm.node.secagg.stages`: the mod, the protocol's stages as this node runs them;
* :mod:`~fedslm.node.secagg.checks`: its checks on the coordinator's stage messages (parameters,
  survivor list, unmask request, the noise in the sum);
* :mod:`~fedslm.node.secagg.signatures`: the institutions' signatures it makes and verifies;
* :mod:`~fedslm.node.secagg.state`: its record of the protocol in its context, and its policy;
* :mod:`~fedslm.node.secagg.payload`: what it masks.

Kept light on purpose (no torch, no models): a deployed node starts a fresh ClientApp process for
every message, and four of the five stages (Flower's four and fedslm's consistency stage) need
nothing but this mod.
"""

from fedslm.node.secagg.checks import check_noise_shares, check_stage, check_survivors, check_unmask
from fedslm.node.secagg.payload import lattice_payload, masked_train_reply, secure_payload
from fedslm.node.secagg.signatures import check_neighbours, sign_setup, sign_survivors
from fedslm.node.secagg.stages import in_protocol, secure_aggregation_mod
from fedslm.node.secagg.state import (BOUND, COHORT, MASKED_WITH, NOISE_HONEST, NOISE_LATTICE, NOISE_NEED,
                                      NOISE_SHARE, PROTOCOL, SESSION, SETUP_VALUES, SIGNED, STATE, VERIFIED,
                                      SecureAggregationRefused, cohort, record_noise, setup_values)

__all__ = [
    "BOUND", "COHORT", "MASKED_WITH", "NOISE_HONEST", "NOISE_LATTICE", "NOISE_NEED", "NOISE_SHARE", "PROTOCOL",
    "SESSION", "SETUP_VALUES", "SIGNED", "STATE", "VERIFIED", "SecureAggregationRefused", "check_neighbours",
    "check_noise_shares", "check_stage", "check_survivors", "check_unmask", "cohort", "in_protocol",
    "lattice_payload", "masked_train_reply", "record_noise", "secure_aggregation_mod", "secure_payload",
    "setup_values", "sign_setup", "sign_survivors",
]
