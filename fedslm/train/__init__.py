"""Local training and evaluation on one node."""

from fedslm.train.evaluate import evaluate, macro_f1
from fedslm.train.local import RoundResult, ledger_path, privacy_plan, train_round
from fedslm.train.node import Node, build_node

__all__ = ["Node", "RoundResult", "build_node", "evaluate", "ledger_path", "macro_f1", "privacy_plan", "train_round"]
