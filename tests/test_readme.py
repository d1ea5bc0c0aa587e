"""Every ```python block of README.md runs, in order, in one namespace, in a fresh interpreter;
so do those of each page of the documentation site (``docs/*.md``), each page in its own.

To leave a block out (say it needs a GPU, Docker or a running worker), put the HTML comment
``<!-- no-test -->`` on the line just before its opening fence:

    <!-- no-test -->
    ```python
    ...
    ```

The README of torch-jax-interop 0.0.8 (``docs/seed-0.0.8-readme.md``, the API contract of
library mode) runs the same way, its ``>>>`` blocks as doctests (see ``SEED_RUNNER``).

The blocks run in a subprocess so that whatever they configure (jax x64 mode, torch
defaults, environment variables) cannot leak into the rest of the test suite, with warnings
as errors, as in pytest's own configuration. A failure names the file and line of the block
and of the failing statement (tracebacks point into the Markdown file). A docs page whose
blocks need a running worker or a GPU marks them ``<!-- no-test -->``, or uses
``connect("inproc", ...)`` as the service-mode examples do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"
SEED_README = DOCS / "seed-0.0.8-readme.md"
SKIP_MARKER = "<!-- no-test -->"
_FENCE = re.compile(r"^(?P<indent>[ ]{0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


class CodeBlock(NamedTuple):
    line: int  # 1-based line of the first code line (just after the opening fence)
    code: str


def python_blocks(text: str) -> list[CodeBlock]:
    """The ```python blocks of a Markdown text, in order, minus those marked no-test."""
    blocks: list[CodeBlock] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, info = opening["fence"], opening["info"].lower()
        body_start = index + 1
        end = body_start
        while end < len(lines) and not lines[end].lstrip().startswith(fence):
            end += 1
        previous = lines[index - 1].strip() if index else ""
        if info in ("python", "py", "python3") and previous != SKIP_MARKER:
            blocks.append(CodeBlock(body_start + 1, "\n".join(lines[body_start:end])))
        index = end + 1
    return blocks


RUNNER = """
import json, sys, traceback, warnings
warnings.simplefilter("error")
# as in pyproject: jax warns when a 64-bit dtype is asked for with x64 off
warnings.filterwarnings("ignore", message="Explicitly requested dtype", category=UserWarning)
blocks = json.loads(BLOCKS)
namespace = {"__name__": "__main__"}
for line, code in blocks:
    try:
        exec(compile("\\n" * (line - 1) + code, FILE, "exec"), namespace)
    except BaseException:
        print(f"{FILE}: the python block starting at line {line} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
print(f"ran {len(blocks)} blocks")
"""


def test_the_parser_skips_marked_blocks_and_other_languages() -> None:
    text = "\n".join(
        [
            "# title",  # 1
            "```python",  # 2
            "a = 1",  # 3
            "```",  # 4
            "<!-- no-test -->",  # 5
            "```python",  # 6
            "raise SystemExit('skipped')",  # 7
            "```",  # 8
            "```bash",  # 9
            "exit 1",  # 10
            "```",  # 11
            "````python",  # 12
            "b = '''",  # 13
            "```",  # 14 (shorter fence: part of the code)
            "'''",  # 15
            "````",  # 16
        ]
    )
    assert python_blocks(text) == [CodeBlock(3, "a = 1"), CodeBlock(13, "b = '''\n```\n'''")]


def test_the_readme_has_the_library_mode_example() -> None:
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block to run"
    library = [b for b in blocks if "torch_to_jax" in b.code and "jax_to_torch" in b.code]
    assert library, "the library-mode example (seed README) is missing or marked no-test"


def _run_blocks(run_python, path: Path) -> None:  # noqa: ANN001
    blocks = python_blocks(path.read_text())
    name = path.relative_to(README.parent).as_posix()
    code = f"FILE = {name!r}\nBLOCKS = {json.dumps([list(b) for b in blocks])!r}\n{RUNNER}"
    result = run_python(code, timeout=300)
    assert result.returncode == 0, f"{result.stderr}\n--- stdout ---\n{result.stdout}"
    assert f"ran {len(blocks)} blocks" in result.stdout


def test_readme_python_blocks_run(run_python) -> None:  # noqa: ANN001
    _run_blocks(run_python, README)


# The seed README runs under its own doctest runner (below).
DOC_PAGES = sorted(p for p in DOCS.glob("*.md") if p != SEED_README)
PAGES_WITH_CODE = [p for p in DOC_PAGES if python_blocks(p.read_text())]


def test_the_docs_pages_with_examples_are_found() -> None:
    names = {p.name for p in PAGES_WITH_CODE}
    assert {"library.md", "service.md"} <= names, f"docs pages with python blocks: {names}"


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.name)
def test_docs_page_python_blocks_run(run_python, page: Path) -> None:  # noqa: ANN001
    _run_blocks(run_python, page)


# The seed README's `>>>` blocks print values of randomly initialised models (an unseeded
# `torch.nn.Linear`, a PRNG whose stream changed across JAX versions): the printed output
# must match in everything but its numbers (types, nesting, shapes, dtypes). Its models are
# on "cuda": without a GPU they run on "cpu" (the only change made to the code).
SEED_RUNNER = """
import doctest, json, re, sys, warnings
import torch
warnings.simplefilter("error")
warnings.filterwarnings("ignore", message="Explicitly requested dtype", category=UserWarning)
NUMBER = re.compile(r"[-+]?(?:[0-9]+[.]?[0-9]*|[.][0-9]+)(?:e[-+]?[0-9]+)?")

def structure(text):
    return NUMBER.sub("#", re.sub(r"\\s+", "", text))

class SameStructure(doctest.OutputChecker):
    def check_output(self, want, got, optionflags):
        return structure(want) == structure(got)

blocks = json.loads(BLOCKS)
namespace = {"__name__": "__main__"}
runner = doctest.DocTestRunner(checker=SameStructure(), verbose=False)
examples = 0
for line, code in blocks:
    if not torch.cuda.is_available():
        code = code.replace('"cuda"', '"cpu"')
    if ">>> " in code:
        test = doctest.DocTestParser().get_doctest(code, namespace, f"block at line {line}",
                                                   "seed README", line - 1)
        examples += len(test.examples)
        result = runner.run(test, clear_globs=False)
        namespace.update(test.globs)  # DocTest works on a copy of the namespace
        if result.failed:
            print(f"the doctest block at line {line} failed", file=sys.stderr)
            sys.exit(1)
    else:
        try:
            exec(compile("\\n" * (line - 1) + code, "seed-0.0.8-readme.md", "exec"), namespace)
        except BaseException:
            import traceback
            print(f"the python block starting at line {line} failed:", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
print(f"ran {len(blocks)} blocks, {examples} doctest examples")
"""


def test_the_structure_check_compares_everything_but_numbers(run_python) -> None:  # noqa: ANN001
    """The doctest checker of ``SEED_RUNNER`` ignores numbers only: a tuple is not a dict, a
    (2, 3) array is not a (3,) one, float32 is not float64."""
    code = SEED_RUNNER.split("blocks = json.loads")[0]
    checks = """
c = SameStructure()
want = "(Array([[-0.46, 0.15],\\n [1e-3, 2.]], dtype=float32), Array(0.39, dtype=float32))"
assert c.check_output(want, "(Array([[1.5, -2.0],\\n  [3., 4.]], dtype=float32), "
                            "Array(-7.25, dtype=float32))", 0)
assert not c.check_output(want, "(Array([[1.5, -2.0, 3.]], dtype=float32), "
                                "Array(-7.25, dtype=float32))", 0)
assert not c.check_output(want, "{'a': Array([[1.5, -2.0],[3., 4.]], dtype=float32), "
                                "'b': Array(-7.25, dtype=float32)}", 0)
assert not c.check_output("Array(0.39, dtype=float32)", "Array(0.39, dtype=int32)", 0)
print("ok")
"""
    result = run_python(code + checks)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_seed_readme_python_blocks_run(run_python) -> None:  # noqa: ANN001
    blocks = python_blocks(SEED_README.read_text())
    assert len(blocks) >= 7, "the seed README's python blocks are missing"
    code = f"BLOCKS = {json.dumps([list(b) for b in blocks])!r}\n{SEED_RUNNER}"
    result = run_python(code, timeout=300)
    assert result.returncode == 0, f"{result.stderr}\n--- stdout ---\n{result.stdout}"
    assert f"ran {len(blocks)} blocks" in result.stdout
    assert ", 0 doctest examples" not in result.stdout
