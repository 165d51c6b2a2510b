"""``report.html``: a run folder's story for a board, one self-contained offline page.

Written by the coordinator after every round (and again when the run ends), from the run folder's
own files: ``metrics.jsonl`` (one line a round), ``summary.json`` (at the end) and ``config.yaml``.
No script, no CDN, no external file: the charts are inline SVG drawn here, so the page opens from a
USB stick. While the run goes on, the page reloads itself every ``REFRESH_SECONDS``; the final page
does not. ``fedslm report RUN_DIR`` rebuilds it.

What it shows: the headline (fixed-test score, weighted held-out score, worst institution, ε);
held-out accuracy (or perplexity) and loss by round; each institution's score, federated against
training alone (``federation.compare_local``); per-class accuracy of the global model at each
institution as a heatmap (simulation: ``summary.json`` ``per_class``; a deployed node never sends
per-class counts); ε spent per institution per round against the cap; bytes, time, errors and
rejected updates per round.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from fedslm.report import read_rounds

REFRESH_SECONDS = 10
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value != -1 else None


def _fmt(value: Any, digits: int = 3, pct: bool = False) -> str:
    v = _num(value)
    if v is None:
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}g}"


# ------------------------------------------------------------------------------------------ charts


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[Optional[float]]]], *, title: str, ylabel: str,
               width: int = 560, height: int = 300, cap: Optional[float] = None, pct: bool = False) -> str:
    """An SVG line chart: ``series`` is (name, xs, ys) with gaps as None; ``cap`` a dashed red line."""
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if _num(y) is not None]
    rows = 1 + sum(20 + 6 * len(name) for name, _, _ in series) // max(width - 70, 1)
    left, right, top, bottom = 56, 12, 36 + 13 * rows, 40
    body = [f'<text x="{width / 2}" y="16" text-anchor="middle" class="t">{_esc(title)}</text>']
    if not pts:
        body.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="m">no data yet</text>')
        return _svg(width, height, body)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    ys = [p[1] for p in pts] + ([cap] if cap is not None else [])
    y0, y1 = min(ys), max(ys)
    if pct:
        y0, y1 = max(0.0, min(y0, 0.0 if y1 - y0 > 0.5 else y0 - 0.05)), min(1.0, y1 + 0.02)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)

    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        body.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="g"/>')
        label = f"{100 * y:.0f}%" if pct else f"{y:.3g}"
        body.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" class="a">{label}</text>')
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        body.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle" class="a">{x:.0f}</text>')
    body.append(f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" class="a">round</text>')
    body.append(f'<text x="12" y="{height / 2}" text-anchor="middle" class="a" '
                f'transform="rotate(-90 12 {height / 2})">{_esc(ylabel)}</text>')
    if cap is not None:
        body.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(cap):.1f}" y2="{sy(cap):.1f}" class="cap"/>')
        body.append(f'<text x="{width - right}" y="{sy(cap) - 4:.1f}" text-anchor="end" class="capt">cap {cap:g}</text>')
    for i, (name, xs_, ys_) in enumerate(series):
        color = PALETTE[i % len(PALETTE)] if name != "all (weighted)" else "#000"
        segment: list[str] = []
        segments = []
        for x, y in zip(xs_, ys_):
            if _num(y) is None:
                if segment:
                    segments.append(segment)
                segment = []
                continue
            segment.append(f"{sx(x):.1f},{sy(float(y)):.1f}")  # type: ignore[arg-type]
        if segment:
            segments.append(segment)
        for seg in segments:
            body.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color}" '
                        f'stroke-width="{2.2 if color == "#000" else 1.4}"/>')
    x, y = left, 32
    for i, (name, _, _) in enumerate(series):
        color = PALETTE[i % len(PALETTE)] if name != "all (weighted)" else "#000"
        step = 20 + 6 * len(name)
        if x + step > width - right:
            x, y = left, y + 13
        body.append(f'<rect x="{x}" y="{y - 4}" width="10" height="3" fill="{color}"/>'
                    f'<text x="{x + 13}" y="{y}" class="l">{_esc(name)}</text>')
        x += step
    return _svg(width, height, body)


def heatmap(rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[Optional[float]]], *,
            title: str, counts: Optional[Sequence[Sequence[int]]] = None) -> str:
    """An SVG heatmap of values in [0, 1] (None: no record of that class there), red (0) to green (1)."""
    cell_w, cell_h, left, top = 34, 24, 110, 120
    width, height = left + cell_w * len(cols) + 12, top + cell_h * len(rows) + 30
    body = [f'<text x="{width / 2}" y="16" text-anchor="middle" class="t">{_esc(title)}</text>']
    for j, col in enumerate(cols):
        x = left + cell_w * j + cell_w / 2
        short = col if len(col) <= 18 else col[:17] + "…"
        body.append(f'<text x="{x:.1f}" y="{top - 6}" class="a" transform="rotate(-55 {x:.1f} {top - 6})">'
                    f'<title>{_esc(col)}</title>{_esc(short)}</text>')
    for i, row in enumerate(rows):
        y = top + cell_h * i
        body.append(f'<text x="{left - 6}" y="{y + cell_h / 2 + 4}" text-anchor="end" class="a">{_esc(row)}</text>')
        for j, v in enumerate(values[i]):
            x = left + cell_w * j
            n = counts[i][j] if counts is not None else None
            if v is None:
                body.append(f'<rect x="{x}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" fill="#eee">'
                            f'<title>{_esc(row)} · {_esc(cols[j])}: no held-out record</title></rect>')
                continue
            tip = f"{_esc(row)} · {_esc(cols[j])}: {100 * v:.0f}%" + (f" of {n}" if n is not None else "")
            body.append(f'<rect x="{x}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" '
                        f'fill="hsl({120 * v:.0f},62%,40%)"><title>{tip}</title></rect>')
            body.append(f'<text x="{x + cell_w / 2}" y="{y + cell_h / 2 + 4}" text-anchor="middle" class="c">'
                        f'{100 * v:.0f}</text>')
    return _svg(width, height, body)


def bar_chart(groups: Sequence[str], series: Sequence[tuple[str, Sequence[Optional[float]]]], *, title: str,
              pct: bool = True, width: int = 560, height: int = 280) -> str:
    left, right, top, bottom = 56, 12, 28, 40
    body = [f'<text x="{width / 2}" y="16" text-anchor="middle" class="t">{_esc(title)}</text>']
    vals = [_num(v) for _, vs in series for v in vs if _num(v) is not None]
    if not vals or not groups:
        body.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="m">no data</text>')
        return _svg(width, height, body)
    y1 = 1.0 if pct else max(vals) * 1.1

    def sy(y: float) -> float:
        return top + (1 - y / y1) * (height - top - bottom)

    group_w = (width - left - right) / len(groups)
    bar_w = group_w * 0.8 / max(len(series), 1)
    for i in range(5):
        y = y1 * i / 4
        body.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="g"/>')
        body.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" class="a">'
                    f'{f"{100 * y:.0f}%" if pct else f"{y:.3g}"}</text>')
    for g, name in enumerate(groups):
        gx = left + group_w * g + group_w * 0.1
        body.append(f'<text x="{gx + group_w * 0.4:.1f}" y="{height - bottom + 14}" text-anchor="middle" '
                    f'class="a">{_esc(name)}</text>')
        for k, (label, vs) in enumerate(series):
            v = _num(vs[g]) if g < len(vs) else None
            if v is None:
                continue
            x = gx + bar_w * k
            body.append(f'<rect x="{x:.1f}" y="{sy(v):.1f}" width="{bar_w - 2:.1f}" height="{sy(0) - sy(v):.1f}" '
                        f'fill="{PALETTE[k % len(PALETTE)]}"><title>{_esc(label)} · {_esc(name)}: '
                        f'{_fmt(v, pct=pct)}</title></rect>')
    for k, (label, _) in enumerate(series):
        body.append(f'<rect x="{left + 6 + 120 * k}" y="{top - 6}" width="10" height="10" '
                    f'fill="{PALETTE[k % len(PALETTE)]}"/><text x="{left + 20 + 120 * k}" y="{top + 3}" '
                    f'class="l">{_esc(label)}</text>')
    return _svg(width, height, body)


def _svg(width: int, height: int, body: Iterable[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">{"".join(body)}</svg>')


# ------------------------------------------------------------------------------------------ the page


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1240px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;font-size:13px} .grid{display:flex;flex-wrap:wrap;gap:16px}
.kpi{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.kpi div{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:130px}
.kpi b{display:block;font-size:20px} .kpi span{font-size:12px;color:#666}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5} td.l,th.l{text-align:left} .status{display:inline-block;padding:2px 8px;border-radius:4px;
font-size:12px;color:#fff} .running{background:#e08a00} .done{background:#2a8a2a} .stopped{background:#c0392b}
.t{font-size:13px;font-weight:600} .a{font-size:10px;fill:#555} .l{font-size:10px;fill:#333} .m{fill:#999}
.c{font-size:9px;fill:#fff} .g{stroke:#eee} .cap{stroke:#c0392b;stroke-dasharray:5 4} .capt{font-size:10px;fill:#c0392b}
.note{font-size:12px;color:#555;max-width:900px}
"""


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.yaml"
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}
    except yaml.YAMLError:
        return {}
    return content if isinstance(content, dict) else {}


def render(folder: str | Path) -> str:
    """The page for the run folder as it stands now."""
    folder = Path(folder)
    rounds = read_rounds(folder)
    trained = [r for r in rounds if r["round"] > 0]
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    cfg = _config(folder)
    fed, priv = cfg.get("federation", {}) or {}, cfg.get("privacy", {}) or {}
    planned = (summary or {}).get("rounds_planned") or fed.get("rounds")
    stopped = any(r.get("stopped") for r in rounds)
    finished = summary is not None
    headline = "accuracy" if any("accuracy" in r.get("eval_weighted", {}) for r in rounds) or \
        (cfg.get("model", {}) or {}).get("task", "classification") == "classification" else "perplexity"
    pct = headline == "accuracy"
    institutions = sorted({c["institution"] for r in rounds for c in r.get("clients", [])})
    status = ("stopped", "stopped") if stopped else (("done", "finished") if finished else ("running", "running"))
    parts = []
    refresh = "" if finished or stopped else f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
    parts.append(f'<!doctype html><html lang="en"><head><meta charset="utf-8">{refresh}'
                 f'<title>fedslm run {_esc(folder.name)}</title><style>{CSS}</style></head><body>')
    parts.append(f'<h1>fedslm run <code>{_esc(folder.name)}</code> <span class="status {status[0]}">{status[1]}</span></h1>')
    parts.append(f'<div class="sub">round {len(trained)} of {_esc(planned)} · {len(institutions)} institutions · '
                 f'strategy {_esc(fed.get("strategy", "?"))} · base {_esc((cfg.get("model", {}) or {}).get("name", "?"))}'
                 f' · written {time.strftime("%Y-%m-%d %H:%M:%S %Z")}'
                 f'{"" if finished or stopped else f" · reloads every {REFRESH_SECONDS} s"}</div>')

    # Headline figures
    last = next((r["eval_weighted"] for r in reversed(trained) if r.get("eval_weighted")), {})
    kpis = []
    if summary and summary.get("fixed_test"):
        kpis.append((_fmt(summary["fixed_test"].get("accuracy"), pct=True),
                     f"fixed test split ({summary['fixed_test'].get('records')} records)"))
    kpis.append((_fmt(last.get(headline), pct=pct), f"held-out {headline}, weighted, last round"))
    if summary and summary.get("worst_institution"):
        w = summary["worst_institution"]
        kpis.append((_fmt(w.get(headline), pct=pct), f"worst institution ({w.get('institution')})"))
    eps = [_num(c.get("epsilon")) for c in (trained[-1]["clients"] if trained else [])]
    eps = [e for e in eps if e is not None]
    if eps:
        kpis.append((f"{max(eps):.2f}", f"largest ε spent (cap {priv.get('max_epsilon') or priv.get('target_epsilon')})"))
    errors = sum(len(r.get("errors", [])) for r in rounds)
    kpis.append((str(errors), "errors and rejected updates"))
    parts.append('<div class="kpi">' + "".join(f"<div><b>{v}</b><span>{_esc(k)}</span></div>" for v, k in kpis) + "</div>")

    # By round
    scored = [r for r in rounds if r.get("eval_weighted")]  # federation.evaluate_every: not every round is scored
    xs = [r["round"] for r in scored]
    per_inst = [(f"institution {i}", xs, [next((c["eval"].get(headline) for c in r["clients"]
                                                 if c["institution"] == i and "eval" in c), None) for r in scored])
                for i in institutions]
    score = line_chart([("all (weighted)", xs, [r["eval_weighted"].get(headline) for r in scored]), *per_inst],
                       title=f"Held-out {headline} by round", ylabel=headline, pct=pct)
    loss = line_chart([("all (weighted)", xs, [r["eval_weighted"].get("loss") for r in scored])],
                      title="Held-out loss by round", ylabel="loss")
    parts.append(f'<h2>Training by round</h2><div class="grid">{score}{loss}</div>')

    # Federated against alone
    if summary:
        per = summary.get("per_institution", {}).get(headline, {})
        local = (summary.get("local_only") or {}).get(headline, {})
        before = (summary.get("initial") or {}).get("per_institution", {}).get(headline, {})
        keys = sorted(per, key=int)
        series = [("before (round 0)", [before.get(k) for k in keys])] if before else []
        series.append(("federated", [per.get(k) for k in keys]))
        if local:
            series.append(("alone, same ε", [local.get(k) for k in keys]))
        rows = "".join(f"<tr><td class=l>institution {k}</td>" + "".join(f"<td>{_fmt(vs[i], pct=pct)}</td>" for _, vs in series)
                       + "</tr>" for i, k in enumerate(keys))
        table = (f"<table><tr><th class=l></th>{''.join(f'<th>{_esc(n)}</th>' for n, _ in series)}</tr>{rows}</table>")
        note = "" if local else ('<p class="note">Set <code>federation.compare_local: true</code> to train each '
                                 'institution alone under the same ε and show what federating bought it.</p>')
        parts.append(f'<h2>Who gained what: each institution, federated and alone</h2><div class="grid">'
                     f'{bar_chart([f"inst. {k}" for k in keys], series, title=f"{headline} on own held-out records", pct=pct)}'
                     f'<div>{table}{note}</div></div>')

    # Per-class accuracy per institution
    per_class = (summary or {}).get("per_class")
    if per_class:
        labels = per_class["labels"]
        insts = sorted(per_class["per_institution"], key=int)
        values = [per_class["per_institution"][k]["per_class_accuracy"] for k in insts]
        counts = [per_class["per_institution"][k]["per_class_records"] for k in insts]
        parts.append('<h2>Per-class accuracy of the global model at each institution</h2>'
                     + heatmap([f"institution {k}" for k in insts], labels, values, counts=counts,
                               title="share of each class's held-out records labelled right")
                     + '<p class="note">Grey: the institution holds no held-out record of that class. A column that '
                       'is red at one institution only is a class its data skew hurts. Counts behind each cell: '
                       '<code>summary.json</code> <code>per_class</code>. Simulation only: a deployed node never '
                       'sends per-class counts.</p>')
    elif finished:
        parts.append('<h2>Per-class accuracy</h2><p class="note">Not recorded for this run. A simulation records '
                     'it when it ends (<code>summary.json</code> <code>per_class</code>); a deployed node releases '
                     'no per-class counts (they would need a DP budget of their own).</p>')

    # Privacy
    cap = _num(priv.get("max_epsilon")) or _num(priv.get("target_epsilon"))
    eps_series = [(f"institution {i}", xs, [next((_num(c.get("epsilon")) for c in r["clients"] if c["institution"] == i),
                                                 None) for r in rounds]) for i in institutions]
    parts.append('<h2>Privacy: ε spent by each institution</h2><div class="grid">'
                 + line_chart(eps_series, title="ε spent (whole ledger) against the cap", ylabel="ε", cap=cap)
                 + '<p class="note">Each institution\'s record-level ε at δ of its own ledger, over every round so '
                   'far. A deployed node whose size is private withholds its ε (its own <code>fedslm ledger show</code> '
                   'has it), and its line is then empty here.</p></div>')

    # Operations
    rows = []
    for r in rounds:
        up = sum(c.get("bytes_up", 0) or 0 for c in r.get("clients", []))
        down = sum(c.get("bytes_down", 0) or 0 for c in r.get("clients", []))
        errs = r.get("errors", [])
        shown = "; ".join(_esc(f"node {e.get('node')}: {e.get('reason')}") for e in errs[:3])
        more = " …" if len(errs) > 3 else ""
        rows.append(f"<tr><td>{r['round']}</td><td>{len(r.get('clients', []))}</td><td>{up / 1e6:.2f}</td>"
                    f"<td>{down / 1e6:.2f}</td><td>{_fmt(r.get('round_seconds'))}</td><td>{len(errs)}</td>"
                    f"<td class=l>{shown}{more}</td></tr>")
    total_up = sum(c.get("bytes_up", 0) or 0 for r in rounds for c in r.get("clients", []))
    total_down = sum(c.get("bytes_down", 0) or 0 for r in rounds for c in r.get("clients", []))
    wall = rounds[-1].get("wall_seconds") if rounds else None
    failed = [e for r in rounds for e in r.get("errors", [])]
    parts.append('<h2>Operations: bytes, time, errors and rejected updates</h2>'
                 f'<div class="kpi"><div><b>{total_up / 1e6:.1f} MB</b><span>sent up by institutions</span></div>'
                 f'<div><b>{total_down / 1e6:.1f} MB</b><span>sent down by the coordinator</span></div>'
                 f'<div><b>{_fmt(wall, 4)} s</b><span>wall time so far</span></div>'
                 f'<div><b>{len(failed)}</b><span>errors and rejected updates</span></div></div>'
                 + (f'<p class="note">Rounds with errors: {", ".join(str(r["round"]) for r in rounds if r.get("errors"))}'
                    '</p>' if failed else "")
                 + f'<details{" open" if len(rounds) <= 12 else ""}><summary>every round</summary>'
                 '<table><tr><th>round</th><th>replies</th><th>MB up</th><th>MB down</th><th>seconds</th>'
                 f'<th>errors</th><th class=l>first errors</th></tr>{"".join(rows)}</table></details>')
    parts.append('<p class="sub">From this run folder\'s metrics.jsonl, summary.json and config.yaml; rebuild with '
                 f'<code>fedslm report {_esc(folder)}</code>.</p></body></html>')
    return "".join(parts)


def write_html(folder: str | Path) -> Path:
    """Write ``folder``/report.html atomically (a coordinator's browser never reads half a page)."""
    folder = Path(folder)
    page = render(folder)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.chmod(tmp, 0o644)
    target = folder / "report.html"
    os.replace(tmp, target)
    return target
