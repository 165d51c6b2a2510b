"""Local training and evaluation on one node."""

from fedslm.train.evaluate import evaluate, macro_f1
from fedslm.train.local import DPSpec, RoundResult, RoundSpec, ledger_path, privacy_plan, round_spec, train_round
from fedslm.train.node import Node, build_node

__all__ = ["DPSpec", "Node", "RoundResult", "RoundSpec", "build_node", "evaluate", "ledger_path", "macro_f1",
           "privacy_plan", "round_spec", "train_round"]
