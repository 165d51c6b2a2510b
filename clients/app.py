"""The fedslm ClientApp: an institution's node. Thin: read the message and node config, call fedslm.

Errors a node can explain (bad data, a refused budget, a different base model) go back as an
error reply carrying the reason; the coordinator logs it and carries on without this node.
Train messages that carry Flower's SecAgg+ protocol go through its mod (fedslm.federation.secagg);
the update is then masked before it leaves the node.
"""

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedslm.errors import FedslmError
from fedslm.federation import codec, secagg
from fedslm.federation.client import client_evaluate, client_secure_train, client_train, node_settings

# Error code for a node refusing or failing a round for a reason it states.
NODE_REFUSED = secagg.NODE_REFUSED

app = ClientApp(mods=[secagg.secure_aggregation_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        request, node = codec.parse_request(msg), node_settings(context.node_config)
        if secagg.in_protocol(msg):
            update, weight, metrics = client_secure_train(request, node)
            return secagg.masked_train_reply(msg, update, weight, metrics)
        state, metrics = client_train(request, node)
    except FedslmError as exc:
        return Message(error=Error(code=NODE_REFUSED, reason=str(exc)), reply_to=msg)
    return codec.train_reply(msg, state, metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        metrics = client_evaluate(codec.parse_request(msg), node_settings(context.node_config))
    except FedslmError as exc:
        return Message(error=Error(code=NODE_REFUSED, reason=str(exc)), reply_to=msg)
    return codec.evaluate_reply(msg, metrics)
