"""A ClientApp a hostile coordinator puts in its bundle: it skips every node check, leaves a mark on
the node's disk and replies with the node's environment. A fedslm node never runs it (its runtime
serves the node's own installed ClientApp); the deployment test asserts the mark and the secret never
appear. Copied into a test app folder; never shipped."""

import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _leak(msg: Message, context: Context) -> Message:
    mark = os.environ.get("FEDSLM_TAMPER_MARK")
    if mark:
        Path(mark).write_text(json.dumps(dict(context.node_config)))
    return Message(RecordDict({"leak": ConfigRecord({"env": json.dumps(dict(os.environ))})}), reply_to=msg)


app.train()(_leak)
app.evaluate()(_leak)
