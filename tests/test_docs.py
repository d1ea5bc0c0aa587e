"""The documentation: the site builds with ``mkdocs build --strict``, its tables are generated,
its links work off the repository, and it reads as a user guide.

The python blocks of README.md and of the docs pages run in ``tests/test_readme.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SEED_README = DOCS / "seed-0.0.8-readme.md"  # 0.0.8's own README, kept as it was
PAGES = sorted(p for p in DOCS.glob("*.md") if p != SEED_README)
URLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)|(?P<bare>https?://[^\s)>`\"]+)")
# Phrases about how the project was made or the machine it was made on, not about its use.
NOT_FOR_USERS = re.compile(
    r"development machine|dev machine|this session|this task|was lent|lent to|helper session"
    r"|when this was written|on this machine",
    re.IGNORECASE,
)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


def test_the_site_builds_strictly_with_generated_tables(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
             "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    performance = (site / "performance" / "index.html").read_text()
    reliability = (site / "reliability" / "index.html").read_text()
    for html in (performance, reliability):
        assert "<!-- generated:" not in html and "<table>" in html
    assert "identity round trip" in performance and "raw jax.dlpack.from_dlpack" in performance
    assert "generated bad inputs sent to a live worker" in reliability
    assert (site / "assets" / "throughput.png").is_file()
    api = (site / "api" / "index.html").read_text()
    for name in ("torch_to_jax", "WrappedJaxFunction", "torch_module_to_jax", "connect",
                 "WorkerConfig", "WorkerUnavailableError"):
        assert name in api, f"the API reference lacks {name}"
    # a link out of docs/ to a repository file became an absolute URL of the repository
    assert f'{URLS["Repository"]}/blob/main/tests/server/test_bounds.py' in reliability


def test_the_hook_fills_tables_and_rejects_what_it_cannot_resolve() -> None:
    hooks = _load("mkdocs_hooks")
    page = "[t](../tests/test_docs.py#L1) and [d](../docs) and [p](library.md)"
    expanded = hooks.expand(page, "page.md")
    repository = URLS["Repository"].rstrip("/")
    assert expanded == (f"[t]({repository}/blob/main/tests/test_docs.py#L1) and "
                        f"[d]({repository}/tree/main/docs) and [p](library.md)")
    with pytest.raises(ValueError, match=r"page.md: the link \.\./no/such/file names no file"):
        hooks.expand("[x](../no/such/file)", "page.md")
    with pytest.raises(ValueError, match="unknown generated table 'speed'.*'performance'"):
        hooks.expand("<!-- generated: speed -->", "page.md")


def test_the_performance_tables_are_the_benchmarks_own_markdown() -> None:
    """Rendering the committed reference run gives what `python -m benchmarks` wrote next to
    it (latest.md, from the same run), so the docs never hold a second, hand-made copy."""
    tables = _load("docs_tables")
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import _report
    finally:
        sys.path.remove(str(ROOT))
    reference = ROOT / "benchmarks" / "results" / "reference.json"
    suite, machine, command = _report.from_json(json.loads(reference.read_text()))
    assert _report.to_markdown(suite, machine, command) == (
        ROOT / "benchmarks" / "results" / "latest.md").read_text()
    with pytest.raises(ValueError, match="schema version 0.*rerun `python -m benchmarks`"):
        _report.from_json({"schema_version": 0})
    assert tables.performance().startswith("Source: `benchmarks/results/")


def test_the_reliability_table_comes_from_recorded_counts(tmp_path: Path) -> None:
    tables = _load("docs_tables")
    snapshot = json.loads(tables.RELIABILITY_SNAPSHOT.read_text())
    assert set(tables.RELIABILITY_SECTIONS) <= set(snapshot), "the snapshot lacks a section"
    rows = tables.reliability_rows(snapshot)
    fuzz = snapshot["fuzz"]
    assert any(f"**{fuzz['generated_cases']:,}**" in row[1] for row in rows)
    assert any(f"**{snapshot['load']['concurrent_calls_checked']:,}**" in row[1] for row in rows)
    # a changed count changes the table: nothing is typed by hand
    changed = json.loads(json.dumps(snapshot))
    changed["fuzz"]["statuses"]["INTERNAL"] = 3
    assert any("**3 INTERNAL or UNKNOWN**" in row[1] for row in tables.reliability_rows(changed))


def test_the_readme_is_short_and_its_links_work_off_the_repository() -> None:
    text = README.read_text()
    assert len(text.encode()) < 10_000, f"README.md is {len(text.encode())} bytes: keep it short"
    site, repository = URLS["Documentation"].rstrip("/") + "/", URLS["Repository"].rstrip("/")
    pages = {p.stem for p in PAGES}
    for match in LINK.finditer(text):
        target = match["target"] or match["bare"]
        if target.startswith("#"):
            continue
        assert target.startswith(("https://", "http://")), (
            f"README.md links to {target!r}: links must be absolute to work on PyPI; use "
            f"{site}... or {repository}/blob/main/..."
        )
        if target.startswith(site):
            page = target[len(site):].split("#")[0].strip("/") or "index"
            assert page in pages, f"README.md links to {target}: no docs/{page}.md"
        elif target.startswith(repository):
            path = target[len(repository):].removeprefix("/blob/main/").split("#")[0]
            assert not path or (ROOT / path).exists(), f"README.md links to missing {path}"
        else:
            assert target.startswith("https://download.pytorch.org/"), (
                f"README.md links to {target}, outside the repository and the docs site"
            )


def test_the_site_config_names_the_urls_of_pyproject() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    assert f"site_url: {URLS['Documentation']}\n" in config
    assert f"repo_url: {URLS['Repository']}\n" in config


def test_every_docs_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in [*PAGES, SEED_README] if f": {p.name}\n" not in config]
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {missing}"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.name)
def test_the_docs_describe_the_project_not_how_it_was_made(path: Path) -> None:
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if NOT_FOR_USERS.search(line)
    ]
    assert not found, "user docs describe the development process or machine:\n" + "\n".join(found)


def test_the_readme_targets_table_is_generated_from_the_committed_run(tmp_path: Path) -> None:
    """The README's performance table is the chosen run's, rewritten by
    `python scripts/docs_tables.py readme`, never typed by hand: the committed README holds
    exactly what the generator writes, and the table lists every issue-16 target of the run."""
    tables = _load("docs_tables")
    readme = ROOT / "README.md"
    copy = tmp_path / "README.md"
    copy.write_text(readme.read_text())
    assert not tables.write_readme(copy), (
        "README.md's targets table is stale: run `python scripts/docs_tables.py readme`")
    block = tables.readme_targets()
    run = json.loads(tables.README_TARGETS_RUN.read_text())
    wanted = [c for c in run["comparisons"]
              if c["target"] and c["target"]["source"] == tables.README_TARGETS_SOURCE]
    assert wanted, "the committed run has no issue-16 targets: rerun the benchmarks"
    rows = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(wanted)  # the header, then one row per target
    assert all(row.rstrip(" |").endswith(("PASS", "MISS", "n/a (not measured)"))
               for row in rows[1:])
    broken = tmp_path / "broken.md"
    broken.write_text("no markers here\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        tables.write_readme(broken)
