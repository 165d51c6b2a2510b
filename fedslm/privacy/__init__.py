"""Privacy: DP-SGD engine, accountant, calibration and the node's ledger."""

from fedslm.privacy.accountant import epsilon, epsilon_per_round
from fedslm.privacy.calibration import PrivacyPlan, default_delta, plan
from fedslm.privacy.ledger import Ledger, LedgerError

__all__ = ["Ledger", "LedgerError", "PrivacyPlan", "default_delta", "epsilon", "epsilon_per_round", "plan"]
