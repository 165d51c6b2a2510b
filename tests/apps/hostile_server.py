"""A hostile coordinator: a ServerApp that sends crafted train requests straight to every node and
writes each reply (its node, error reason or metrics) to ``<scenario>.replies.json``. The adversary
in the hostile-coordinator tests over real processes; copied into a test app folder, never shipped."""

import json
import time
from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedslm.config import load_config, to_yaml
from fedslm.lora import get_adapter_state, wrap
from fedslm.lora.adapter import frozen_digest
from fedslm.models import load_base
from fedslm.wire import codec

app = ServerApp()

SECRET_VAR = "FEDSLM_TEST_SECRET"


def attacks(base: dict) -> list[tuple[str, int, dict]]:
    """(name, round, config) in the order they are sent; the honest round spends the nodes' budget."""

    def edit(**sections):
        out = json.loads(json.dumps(base))
        for section, values in sections.items():
            out[section].update(values)
        return out

    # The rest of the threat model runs in process (tests/test_hostile_coordinator.py); these are the
    # attacks that must also fail over real processes.
    return [
        ("env-interpolation", 1, edit(model={"name": "${oc.env:" + SECRET_VAR + "}"})),
        ("non-private", 1, edit(privacy={"enabled": False})),
        ("honest", 1, base),
        # Round 2: a repeat of round 1 with the same adapter would be answered from the paid release.
        ("split-seed", 2, edit(data={"split_seed": 5, "test_fraction": 0.3, "max_train_records": 20},
                               privacy={"ledger": "/tmp/fedslm-fresh-ledger.json", "delta": 0.4},
                               output={"dir": "/tmp/fedslm-hostile-out"})),
    ]


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = Path(str(context.run_config["fedslm-config"]))
    cfg = load_config([scenario])
    labels = list(cfg.data.labels)
    base = load_base(cfg.model, len(labels))
    model = wrap(base.model, cfg.lora, cfg.model.task, base.target_modules, seed=cfg.train.seed)
    initial = codec.state_to_record(get_adapter_state(model))
    deadline = time.monotonic() + 120
    while len(grid.get_node_ids()) < cfg.federation.min_clients and time.monotonic() < deadline:
        time.sleep(1)
    nodes = sorted(grid.get_node_ids())
    replies = []
    for name, server_round, content in attacks(yaml.safe_load(to_yaml(cfg))):
        text = yaml.safe_dump(content)
        messages = [Message(RecordDict({
            codec.ARRAYS: initial,
            codec.CONFIG: ConfigRecord({**codec.request_config(text, base.fingerprint, "hostile-run",
                                                               frozen_digest(model)),
                                        "server-round": server_round}),
        }), dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
        for reply in grid.send_and_receive(messages, timeout=cfg.federation.round_timeout):
            entry = {"attack": name, "node": reply.metadata.src_node_id}
            if reply.has_error():
                entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
            else:  # every record the node sent, by name (a bundle's own ClientApp would send others)
                entry["records"] = sorted(reply.content.keys())
                if "leak" in reply.content:
                    entry["leak"] = dict(reply.content.config_records["leak"])
                else:
                    entry["metrics"] = dict(codec.reply_metrics(reply))
            replies.append(entry)
    scenario.with_suffix(".replies.json").write_text(json.dumps(replies, indent=1))
