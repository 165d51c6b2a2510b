"""The fedslm ClientApp: an institution's node. Thin: read the node config and message, call fedslm.

A deployed node runs this module from its own installation (``fedslm node start``,
fedslm.node.runtime); outside a simulation it refuses to serve from anywhere else, so a SuperNode
that runs the coordinator's bundle cannot pass for one that runs its own code.

The node config names the institution's policy (``policy="/path/policy.yaml"``); every request is
planned through it (fedslm.node.plan). Anything that goes wrong goes back as an error reply with a
category and a fixed reason only (fedslm.wire.errors); the details go to this node's log. Train
messages that carry Flower's SecAgg+ protocol go through its mod (fedslm.node.secagg); the update is
then masked before it leaves the node.

A deployed node starts a fresh process for every message, so the heavy part of fedslm (torch, the
models, Opacus) is imported by the handlers that need it: SecAgg+'s key-exchange and unmask stages,
answered by the mod alone, start in about a second. A simulation's engine instead serves every round
in a few long-lived processes, which a ``query.warmup`` message from the ServerApp lets import that
part while the coordinator is still building its model (fedslm.coordinator.warmup); a deployed node
refuses it.
"""

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedslm.node import runtime, secagg
from fedslm.wire.errors import NODE_REFUSED

__all__ = ["NODE_REFUSED", "app"]


def own_code_mod(msg: Message, context: Context, call_next) -> Message:
    """Outside a simulation, serve only in a process this node's runtime started."""
    if runtime.serving() or runtime.simulated():
        return call_next(msg, context)
    from fedslm.node.errors import refusal
    from fedslm.node.policy import PolicyError

    return Message(error=refusal(PolicyError(
        "this ClientApp was loaded from the coordinator's app bundle by a plain flower-supernode; a fedslm "
        "node runs its own installed code: start it with `fedslm node start` (same arguments)"), "serve"),
        reply_to=msg)


app = ClientApp(mods=[own_code_mod, secagg.secure_aggregation_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedslm.node.errors import refusal

    try:
        from fedslm.node.serve import client_secure_train, client_train, node_context
        from fedslm.wire import codec

        request, node = codec.parse_request(msg), node_context(context.node_config)
        if secagg.in_protocol(msg):
            noise: dict = {}
            update, weight, metrics = client_secure_train(request, node, secagg.cohort(context),
                                                          setup=secagg.setup_values(context), noise=noise)
            secagg.record_noise(context, noise)
            return secagg.masked_train_reply(msg, update, weight, metrics)
        state, metrics = client_train(request, node)
    except Exception as exc:  # noqa: BLE001 - nothing of the node may reach the reply: category only
        return Message(error=refusal(exc, "train"), reply_to=msg)
    return codec.train_reply(msg, state, metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedslm.node.errors import refusal

    try:
        from fedslm.node.serve import client_evaluate, node_context
        from fedslm.wire import codec

        metrics = client_evaluate(codec.parse_request(msg), node_context(context.node_config))
    except Exception as exc:  # noqa: BLE001 - as above
        return Message(error=refusal(exc, "evaluate"), reply_to=msg)
    return codec.evaluate_reply(msg, metrics)


@app.query("warmup")
def warmup(msg: Message, context: Context) -> Message:  # noqa: ARG001 - Flower's handler signature
    """A simulated institution's process imports what its rounds need and answers with nothing; the
    message carries nothing and nothing is read, planned or charged. A deployed node (a fresh process per
    message, and a preloader that has imported all this already) refuses it."""
    if not runtime.simulated():
        from fedslm.node.errors import refusal
        from fedslm.node.plan import PolicyRefusal

        return Message(error=refusal(PolicyRefusal("query.warmup is for a simulation's engine; a deployed node "
                                                   "refuses it"), "warmup"), reply_to=msg)
    import fedslm.node.serve  # noqa: F401 - torch, transformers, PEFT, Opacus: several seconds, once a process

    return Message(RecordDict(), reply_to=msg)
