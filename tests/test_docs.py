"""The docs site: `mkdocs build --strict` passes (no broken link, no missing page), and the reference pages
are what the schemas and the CLI generate now (regenerate with `python -m fedslm.docs_ref`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from fedslm import docs_ref
from fedslm.config import Config, to_yaml
from fedslm.node.policy import NodePolicy

ROOT = Path(__file__).resolve().parent.parent


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=config.parent)


def test_mkdocs_build_strict_passes_and_serves_every_page_and_result(tmp_path):
    done = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    site = tmp_path / "site"
    for page in ("institutions", "coordinators", "researchers", "privacy", "reference/config", "reference/policy",
                 "reference/cli", "reference/run-folder", "results/benchmarks"):
        assert (site / page / "index.html").is_file(), page
    # Each committed study result is a page of its own, with its plot beside it.
    for md in (ROOT / "benchmarks" / "results").glob("*.md"):
        assert (site / "results" / md.stem / "index.html").is_file(), md.name
        if md.with_suffix(".png").is_file():
            assert (site / "results" / md.with_suffix(".png").name).is_file()
    recipe = (site / "results" / "recipe" / "index.html").read_text(encoding="utf-8")
    assert "centralized, non-private" in recipe  # the study's table, served whole


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The build in make test really is strict: the same site with one dead link does not build."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copytree(ROOT / "benchmarks" / "results", copy / "benchmarks" / "results")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    page = copy / "docs" / "privacy.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the missing page](no-such-page.md).\n", encoding="utf-8")
    done = _build(copy / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-page.md" in done.stdout + done.stderr


def test_the_committed_reference_pages_are_what_the_schemas_and_cli_generate():
    for name, text in docs_ref.pages().items():
        committed = docs_ref.PAGES[name].read_text(encoding="utf-8")
        assert committed == text, f"{docs_ref.PAGES[name].relative_to(ROOT)} is out of date: run {docs_ref.COMMAND}"


def test_every_key_has_a_meaning_and_no_gloss_is_stale():
    assert docs_ref.undocumented() == [], f"document each key (a comment above its field), then run {docs_ref.COMMAND}"


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        if isinstance(v, dict) and v and not (prefix + k).endswith("peers"):
            keys |= _leaves(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def test_every_config_and_policy_key_has_a_row():
    """Checked against the keys the loader itself writes (config) and the dataclass tree (policy), not the
    generator's own walk."""
    config = (ROOT / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    keys = _leaves(yaml.safe_load(to_yaml(Config())))
    assert len(keys) > 80
    for key in keys:
        assert f"| `{key}` |" in config, key
    policy = (ROOT / "docs" / "reference" / "policy.md").read_text(encoding="utf-8")
    keys = _leaves(dataclasses.asdict(NodePolicy()))
    assert len(keys) > 40
    for key in keys:
        assert f"| `{key}` |" in policy, key


def test_the_generator_reads_type_default_and_the_comment_above_each_field(tmp_path):
    (tmp_path / "fake_schema.py").write_text(
        "from dataclasses import dataclass, field\n"
        "from typing import Optional\n\n"
        "@dataclass\n"
        "class Inner:\n"
        "    \"\"\"The inner section.\"\"\"\n\n"
        "    # How many | widgets,\n"
        "    # over two lines.\n"
        "    widgets: int = 3\n"
        "    name: Optional[str] = None\n\n"
        "@dataclass\n"
        "class Outer:\n"
        "    # A flag.\n"
        "    flag: bool = True\n"
        "    inner: Inner = field(default_factory=Inner)\n")
    spec = importlib.util.spec_from_file_location("fake_schema", tmp_path / "fake_schema.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_schema"] = module
    try:
        spec.loader.exec_module(module)
        out = docs_ref.sections(module.Outer, "", {"inner.name": "The name."})
    finally:
        del sys.modules["fake_schema"]
    assert out[0][2] == [("flag", "bool", "`true`", "A flag.")]
    assert out[1][0] == "inner"
    assert out[1][2] == [("inner.widgets", "int", "`3`", "How many | widgets, over two lines."),
                         ("inner.name", "Optional[str]", "`null`", "The name.")]


def test_check_passes_on_the_committed_pages_and_names_the_command_on_a_stale_one(tmp_path, monkeypatch, capsys):
    assert docs_ref.main(["--check"]) == 0
    stale = {name: tmp_path / f"{name}.md" for name in docs_ref.PAGES}
    for name, path in stale.items():
        path.write_text(docs_ref.PAGES[name].read_text(encoding="utf-8"), encoding="utf-8")
    stale["config"].write_text("# Configuration reference\n", encoding="utf-8")  # a page someone edited by hand
    monkeypatch.setattr(docs_ref, "PAGES", stale)
    monkeypatch.setattr(docs_ref, "ROOT", tmp_path)
    assert docs_ref.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "config.md" in err and "policy.md" not in err and docs_ref.COMMAND in err
    assert docs_ref.main([]) == 0 and docs_ref.main(["--check"]) == 0  # regenerating fixes it
