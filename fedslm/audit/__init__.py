"""Empirical privacy auditing: one-run canary audits (Steinke, Nasr and Jagielski, 2023)."""

from fedslm.audit.one_run import AuditResult, epsilon_lower_bound, p_value, run_audit, write_audit

__all__ = ["AuditResult", "epsilon_lower_bound", "p_value", "run_audit", "write_audit"]
