"""Every code block of docs/guide.md runs as written.

- ```` ```python ```` blocks run in document order in one namespace (a later block may use the
  ``model`` an earlier one built), in this process;
- ```` ```python subprocess ```` blocks run each in a fresh interpreter (they start a process
  group, which must not leak into this one);
- ```` ```pycon ```` blocks are doctests: outputs and error messages must match (``...`` elides);
- ```` ```python no-run ```` blocks are not run (several processes, a Trainer).
"""

from __future__ import annotations

import doctest
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
KNOWN = {("python", ""), ("python", "subprocess"), ("python", "no-run"), ("pycon", ""), ("bash", "")}


def _blocks(kind: str, marker: str = "") -> list[tuple[int, str]]:
    """(line number, code) of the guide's blocks with this language and marker."""
    text = GUIDE.read_text()
    found = []
    for match in FENCE.finditer(text):
        if (match.group(1), match.group(2).strip()) == (kind, marker):
            found.append((text[: match.start()].count("\n") + 1, match.group(3)))
    return found


def test_every_block_is_of_a_known_kind() -> None:
    text = GUIDE.read_text()
    kinds = {(m.group(1), m.group(2).strip()) for m in FENCE.finditer(text)}
    assert kinds <= KNOWN, f"unknown code block kinds {kinds - KNOWN}: mark them as in this file's docstring"
    assert _blocks("python") and _blocks("pycon")


def test_python_blocks_run_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict = {"__name__": "guide"}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line, code in _blocks("python"):
            try:
                exec(compile(code, f"{GUIDE}:{line}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"docs/guide.md block at line {line} failed: {error!r}") from error
    finally:
        torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.parametrize(("line", "code"), _blocks("python", "subprocess"), ids=lambda v: str(v)[:8])
def test_subprocess_blocks_run(line: int, code: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code)
    root = GUIDE.parent.parent
    with socket.socket() as sock:  # a free port, in case blocks run in parallel
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": port,
    }
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"docs/guide.md block at line {line} failed:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize(("line", "code"), _blocks("pycon"), ids=lambda v: str(v)[:8])
def test_pycon_blocks_are_doctests(line: int, code: str) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(code, {}, f"guide.md:{line}", str(GUIDE), line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)
