"""Errors a user can act on. The CLI prints their message as one line, never a traceback."""


class FedslmError(Exception):
    """Base class: the message alone tells the user what to fix."""


class ConfigError(FedslmError):
    """A config key or value no run can use; the message names the key."""


class DataError(FedslmError):
    """Input data that cannot be read; the message names the file, line and column."""


class ModelError(FedslmError):
    """A model that cannot be loaded offline (missing directory, unknown preset)."""


class BudgetExceededError(FedslmError):
    """Training that would take a node's privacy spend past its own cap."""
