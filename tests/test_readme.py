"""Every ```python block of README.md runs, in order, in one namespace, in a fresh interpreter.

To leave a block out (say it needs a GPU, Docker or a running worker), put the HTML comment
``<!-- no-test -->`` on the line just before its opening fence:

    <!-- no-test -->
    ```python
    ...
    ```

The blocks run in a subprocess so that whatever they configure (jax x64 mode, torch
defaults, environment variables) cannot leak into the rest of the test suite, with warnings
as errors, as in pytest's own configuration. A failure names the README line of the block
and of the failing statement (tracebacks point into README.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

README = Path(__file__).resolve().parents[1] / "README.md"
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
        exec(compile("\\n" * (line - 1) + code, "README.md", "exec"), namespace)
    except BaseException:
        print(f"README.md: the python block starting at line {line} failed:", file=sys.stderr)
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


def test_readme_python_blocks_run(run_python) -> None:  # noqa: ANN001
    blocks = python_blocks(README.read_text())
    code = f"BLOCKS = {json.dumps([list(b) for b in blocks])!r}\n{RUNNER}"
    result = run_python(code, timeout=300)
    assert result.returncode == 0, f"{result.stderr}\n--- stdout ---\n{result.stdout}"
    assert f"ran {len(blocks)} blocks" in result.stdout
