"""The coordinator's side: strategies, screening updates, the SecAgg+ driver, client-level DP, the
run folder and checkpoint/resume. Imports nothing from :mod:`fedslm.node`."""
