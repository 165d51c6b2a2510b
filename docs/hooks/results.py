"""MkDocs hook: serve the studies' results (benchmarks/results/*) under results/ without copying them.

MkDocs only reads files under docs/; the benchmark scripts write their tables and plots to
benchmarks/results/. Each NAME.md there becomes the page results/NAME.md (its table, then NAME.png when
there is one), each .png and .json is served beside it, and benchmarks/README.md (the measured figures,
with dates) becomes results/benchmarks.md with its links pointed at those pages. A result that disappears
breaks the links to it, which `mkdocs build --strict` (tests/test_docs.py) reports.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

TITLES = {
    "recipe": "The recipe, one lever at a time",
    "privacy_utility": "Privacy and utility",
    "levers": "Levers at ε = 8",
    "audit": "One-run privacy audit",
    "dp_overhead": "DP-SGD overhead (MiniLM)",
    "dp_overhead_gemma3-270m": "DP-SGD overhead (Gemma-3-270M)",
    "federation_overhead": "Federation overhead",
    "scale": "Scale: 10 to 100 institutions",
    "predict": "Prediction throughput",
    "generative": "The generative path (Gemma-3-270M)",
    "generative_50_steps": "The generative path, 50 DP steps",
}


def _results(config) -> Path:
    return Path(config.config_file_path).resolve().parent / "benchmarks" / "results"


def on_files(files, config):
    results = _results(config)
    for path in sorted(results.glob("*")):
        if path.suffix in (".png", ".json"):
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
        elif path.suffix == ".md":
            title = TITLES.get(path.stem, path.stem.replace("_", " "))
            body = path.read_text(encoding="utf-8")
            plot = f"\n\n![{title}]({path.stem}.png)\n" if path.with_suffix(".png").is_file() else "\n"
            source = (f"\n\n*Written by `benchmarks/{path.stem.split('_gemma')[0]}.py` to "
                      f"`benchmarks/results/{path.name}`.*\n")
            files.append(File.generated(config, f"results/{path.stem}.md",
                                        content=f"# {title}\n\n{body}{plot}{source}"))
    readme = results.parent / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        text = text.replace("](results/", "](")
        text = re.sub(r"\]\(#levers[^)]*\)", "](levers.md)", text)
        text = re.sub(r"\]\(\.\./README\.md(#[^)]*)?\)", "](index.md)", text)
        files.append(File.generated(config, "results/benchmarks.md", content=text))
    return files
