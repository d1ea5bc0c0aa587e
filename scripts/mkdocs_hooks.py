"""MkDocs hooks (``hooks:`` in mkdocs.yml): generated tables and links into the repository.

* ``<!-- generated: performance -->`` and ``<!-- generated: reliability -->`` in a page are
  replaced by the tables of ``scripts/docs_tables.py`` (never typed by hand).
* A relative link out of ``docs/`` to a file of the repository (``](../tests/x.py)``, which
  works when the page is read on the repository's web view) becomes an absolute URL built from
  the ``Repository`` URL in pyproject.toml's ``[project.urls]`` (the one place it is spelled),
  so that it works on the published site too.
* The benchmarks' throughput plot becomes the site file ``assets/throughput.png``.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import docs_tables  # noqa: E402  (a sibling script, found through the path set above)

GENERATED = re.compile(r"<!-- generated: (?P<what>[a-z]+) -->")
REPO_LINK = re.compile(r"\]\(\.\./(?P<path>[^)#\s]+)(?P<anchor>#[^)\s]*)?\)")
TABLES = {"performance": docs_tables.performance, "reliability": docs_tables.reliability}


def repository_url() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Repository"].rstrip("/")


def expand(markdown: str, page: str) -> str:
    """The page's Markdown with its generated tables and repository links filled in."""

    def table(match: re.Match[str]) -> str:
        what = match["what"]
        if what not in TABLES:
            raise ValueError(f"{page}: unknown generated table {what!r}; known: {sorted(TABLES)}")
        return TABLES[what]()

    def link(match: re.Match[str]) -> str:
        path = match["path"]
        if not (ROOT / path).exists():
            raise ValueError(f"{page}: the link ../{path} names no file of the repository")
        kind = "tree" if (ROOT / path).is_dir() else "blob"
        return f"]({repository_url()}/{kind}/main/{path}{match['anchor'] or ''})"

    return REPO_LINK.sub(link, GENERATED.sub(table, markdown))


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    return expand(markdown, page.file.src_uri)


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File

    if docs_tables.THROUGHPUT_PLOT.is_file():
        files.append(File.generated(config, "assets/throughput.png",
                                    abs_src_path=str(docs_tables.THROUGHPUT_PLOT)))
    return files
