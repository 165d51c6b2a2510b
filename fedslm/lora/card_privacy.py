"""What a model card says about privacy: the guarantee stated exactly, from summary.json and config.yaml.

ε and δ are rounded *up* (a card must never state a stronger guarantee than the run has); a figure a node
withheld or the run did not measure says so. Kept apart from the rest of the card (fedslm.lora.card) so
that a privacy officer can review the statement alone.
"""

from __future__ import annotations

import math
from typing import Any, Optional

NOT_MEASURED = "not measured"


def up(x: float, sig: int = 4) -> str:
    """``x`` rounded up to ``sig`` significant digits: a privacy figure is never understated."""
    if x == 0 or not math.isfinite(x):
        return "∞" if x == math.inf else str(x)
    q = 10.0 ** (math.floor(math.log10(abs(x))) - sig + 1)
    r = x / q
    r = round(r) if abs(r - round(r)) <= 1e-9 * abs(r) else math.ceil(r)
    return f"{r * q:.{sig}g}"


def cell(text: Any) -> str:
    """A value from a file, safe in a Markdown table cell (labels are data: no markup, no row breaks)."""
    return (str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", " ").replace("\n", " "))


def reported(x: Any) -> Optional[float]:
    """A reported figure, or None when absent or withheld (deployed nodes send -1 for a withheld value)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        return None
    return float(x)


def privacy_section(s: dict[str, Any], cfg: dict[str, Any], federated: bool,
                    simulated: bool) -> tuple[list[str], dict[str, Any]]:
    """The card's "Privacy guarantee" lines, and the exact figures they state (for the card's metadata).
    ``s``: summary.json; ``cfg``: config.yaml as a plain dict; ``simulated``: the run config stood for
    every institution's node policy, so its accountant is theirs."""

    def c(section: str, key: str, default: Any = None) -> Any:
        sec = cfg.get(section)
        return sec.get(key, default) if isinstance(sec, dict) else default

    lines: list[str] = []
    add = lines.append
    add("## Privacy guarantee")
    add("")
    privacy = s.get("privacy") or {}
    accountant = c("privacy", "accountant") or "rdp"
    enabled = c("privacy", "enabled", True) is not False
    exact_priv: dict[str, Any] = {}
    if federated:
        per = privacy.get("per_institution") or {}
        exact_priv["unit"] = privacy.get("unit")
        exact_priv["per_institution"] = per
        if not enabled:
            add("**No differential privacy**: `privacy.enabled` was false, ε = ∞. The updates this adapter "
                "was averaged from carry no DP guarantee.")
        else:
            add(f"Record-level differential privacy at every institution. Unit of privacy: "
                f"{privacy.get('unit') or 'one record of one institution'}; each institution's ε composes every "
                "round it served (its ledger, on its own machine) and covers everything it sent, by "
                "post-processing: whoever sees the adapters (the coordinator, the other institutions, a reader "
                "of this adapter) learns about any one record at most what ε allows, with probability 1 − δ.")
            add("")
            distributed = any("epsilon_alone" in (v or {}) for v in per.values())
            honest = c("privacy", "distributed", {}) or {}
            head = "| institution | ε | δ |" + (" ε of its own noise alone |" if distributed else "")
            add(head)
            add("|---|---|---|" + ("---|" if distributed else ""))
            for inst, v in sorted(per.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
                eps, dlt = reported((v or {}).get("epsilon")), reported((v or {}).get("delta"))
                row = (f"| {cell(inst)} | {up(eps) if eps is not None else 'withheld by the institution'} | "
                       f"{up(dlt) if dlt is not None else 'withheld'} |")
                if distributed:
                    alone = reported((v or {}).get("epsilon_alone"))
                    row += f" {up(alone) if alone is not None else NOT_MEASURED} |"
                add(row)
            if not per:
                add(f"| (none reported) | {NOT_MEASURED} | {NOT_MEASURED} |")
            add("")
            if distributed:
                add("Distributed DP under secure aggregation (SecAgg+): ε is that of the **secure sum**, which "
                    f"holds only if {honest.get('honest', 'the assumed number of')} contributors each added "
                    "their share of the noise; the last column is the guarantee of each institution's own "
                    "noise alone, should no other add any.")
                add("")
            acc_line = (f"- accountant: `{accountant}` (Opacus), composing every DP-SGD step"
                        if simulated else
                        f"- accountant: each institution composes with its own policy's accountant "
                        f"(the run asked for `{accountant}`)")
            add(acc_line)
            if privacy.get("noise_source"):
                add(f"- noise: {privacy['noise_source']}")
        cl = privacy.get("client_level")
        if cl:
            eps, dlt = reported(cl.get("epsilon")), reported(cl.get("delta"))
            exact_priv["client_level"] = {"epsilon": cl.get("epsilon"), "delta": cl.get("delta")}
            add(f"- client-level DP at aggregation: ε = {up(eps) if eps is not None else NOT_MEASURED} at "
                f"δ = {up(dlt) if dlt is not None else NOT_MEASURED} for {cl.get('unit', 'one institution')}, "
                f"over {cl.get('rounds')} rounds ({cl.get('accountant', 'rdp')}); the coordinator adds this "
                "noise, so it does not protect an institution from the coordinator")
        else:
            add("- client-level DP: off")
        add("- secure aggregation (SecAgg+): " + ("on: the coordinator saw only the sum of the updates"
                                                 if privacy.get("secure_aggregation") else "off"))
    else:
        eps, dlt = reported(privacy.get("epsilon")), reported(privacy.get("delta"))
        exact_priv = {"unit": s.get("unit"), "epsilon": privacy.get("epsilon"), "delta": privacy.get("delta")}
        if not privacy.get("enabled", enabled) or eps is None:
            add("**No differential privacy**: this adapter was trained without DP (ε = ∞).")
        else:
            add(f"Record-level differential privacy (DP-SGD). Unit of privacy: one record of this institution's "
                f"data, privacy unit `{cell(s.get('unit') or c('privacy', 'unit') or 'all-records')}`.")
            add("")
            add(f"- **ε = {up(eps)}, δ = {up(dlt) if dlt is not None else NOT_MEASURED}**: the ledger's "
                "total for this privacy unit after this run (every run charged to the unit counts)")
            add(f"- accountant: `{accountant}` (Opacus); noise multiplier σ = "
                f"{up(privacy['noise_multiplier']) if reported(privacy.get('noise_multiplier')) is not None else NOT_MEASURED}, "
                f"sample rate q = {f'{q:.4g}' if (q := reported(privacy.get('sample_rate'))) is not None else NOT_MEASURED}")
            if privacy.get("noise_source"):
                add(f"- noise: {privacy['noise_source']}")
    add("")
    add("ε does not cover the label set, the size of each institution's data, or facts shared by many records; "
        "it does not protect records from the institution that holds them.")
    add("")

    return lines, exact_priv
