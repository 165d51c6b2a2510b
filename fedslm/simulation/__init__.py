"""The researcher's driver: a local SuperLink + ``flwr run``, and local-only baselines."""
