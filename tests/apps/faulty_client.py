"""A ClientApp that trains honestly, then corrupts its reply as its node config says: the adversary
in the wire-level tests. Node config ``faults="nan,shape"`` picks the fault by round (round r takes
entry r-1, cycling). Copied into a test app folder next to the real apps; never shipped."""

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

import fedslm.node.app as honest  # its handlers, past the mods: this adversary skips the own-code check
from fedslm.wire import codec

app = ClientApp()


def corrupt(reply: Message, fault: str) -> Message:
    state = codec.reply_state(reply)
    key = sorted(state)[0]
    if fault == "nan":
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    elif fault == "inf":
        state[key] = torch.full_like(state[key], float("inf"))
    elif fault == "shape":
        state[key] = torch.cat([state[key].flatten(), torch.zeros(1)])
    elif fault == "extra-key":
        state["base_model.model.bert.embeddings.word_embeddings.weight"] = torch.zeros(8, 4)
    elif fault == "missing-key":
        del state[key]
    elif fault == "norm":
        state[key] = state[key] + 1e4
    elif fault == "oversized":
        reply.content["padding"] = ConfigRecord({"blob": b"\0" * (4 * 2**20)})
    else:
        raise ValueError(f"unknown fault {fault!r}")
    reply.content[codec.ARRAYS] = codec.state_to_record(state)
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    faults = [f for f in str(context.node_config.get("faults", "")).split(",") if f]
    if faults and not reply.has_error():
        server_round = int(msg.content[codec.CONFIG]["server-round"])
        reply = corrupt(reply, faults[(server_round - 1) % len(faults)])
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
