"""Runs the Python code blocks of Markdown pages and of docstrings.

Every ```python (or ```py) fenced block of a page runs, in order, in one
namespace shared by the whole page; other fences do not run. HTML comments,
invisible on the rendered page, steer the run:

- `<!-- doc-test: skip: REASON -->` right before a block (only blank lines
  between) skips that block; the reason is required.
- `<!-- doc-test: setup` ... `-->` over several lines is hidden code, run at
  its place in the sequence (tiny data for the visible blocks).
- `<!-- doc-test: backend NAME: REASON -->` anywhere: the page runs only on
  that Keras backend (the test is skipped, with the reason, on the other).

A line `--8<-- "path"` in a block is replaced by that file, as
pymdownx.snippets does on the site. In docstrings, only the blocks of the
`Example:`/`Examples:` section run.
"""

from __future__ import annotations

import dataclasses
import inspect
import linecache
import os
import re
import textwrap
import traceback

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
DIRECTIVE = re.compile(r"^ *<!--\s*doc-test:\s*(?P<body>.*?)\s*(?P<end>-->)?\s*$")
SNIPPET = re.compile(r"^(?P<indent>\s*)-+8<-+\s+[\"'](?P<path>[^\"']+)[\"']\s*$")
SECTION = re.compile(
    r"^(Args|Arguments|Attributes|Example|Examples|Note|Notes|Raises|Returns"
    r"|See Also|Warning|Warnings|Yields|Methods|References):\s*$"
)
PYTHON = {"python", "py", "python3"}


class DocBlockError(AssertionError):
    """A malformed directive, or a block that raised; names file and line."""


@dataclasses.dataclass
class Block:
    """Code to run: `line` is the file line of its first source line."""

    path: str
    line: int
    source: str
    kind: str  # "code" (a visible block) or "setup" (a hidden comment)


@dataclasses.dataclass
class Page:
    """The runnable blocks of one file (or docstring), in order."""

    path: str
    blocks: list[Block] = dataclasses.field(default_factory=list)
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    backend: tuple[str, str] | None = None  # (name, reason)


def _unindent(lines, indent):
    """Removes up to `indent` leading spaces from each line (as CommonMark)."""
    return [ln[min(indent, len(ln) - len(ln.lstrip(" "))) :] for ln in lines]


def parse_markdown(text: str, path: str, first_line: int = 1) -> Page:
    """Splits Markdown `text` into blocks; `first_line` is the line of its start."""
    page, lines, i, skip = Page(path), text.splitlines(), 0, None
    while i < len(lines):
        line, number = lines[i], first_line + i
        fence, directive = FENCE.match(line), DIRECTIVE.match(line)
        if skip and line.strip() and not fence:
            raise DocBlockError(f"{path}:{skip[0]}: skip comment not before a block")
        if directive:
            body = directive["body"]
            if body.startswith("setup") and not directive["end"]:
                end = next(
                    (j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"),
                    None,
                )
                if end is None:
                    raise DocBlockError(f"{path}:{number}: setup comment not closed")
                indent = len(line) - len(line.lstrip(" "))
                source = "\n".join(_unindent(lines[i + 1 : end], indent))
                page.blocks.append(Block(path, number + 1, source, "setup"))
                i = end
            elif not directive["end"]:
                raise DocBlockError(f"{path}:{number}: put this comment on one line")
            elif m := re.fullmatch(r"skip\s*(?::\s*(.*))?", body):
                if not m[1]:
                    raise DocBlockError(f"{path}:{number}: skip needs ': REASON'")
                skip = (number, m[1])
            elif m := re.fullmatch(r"backend\s+(\w+)\s*(?::\s*(.*))?", body):
                if not m[2]:
                    raise DocBlockError(f"{path}:{number}: backend needs ': REASON'")
                page.backend = (m[1], m[2])
            else:
                raise DocBlockError(f"{path}:{number}: unknown directive {line!r}")
        elif fence:
            close = re.compile(rf"^ *{fence['fence'][0]}{{{len(fence['fence'])},}}\s*$")
            end = next(
                (j for j in range(i + 1, len(lines)) if close.match(lines[j])), None
            )
            if end is None:
                raise DocBlockError(f"{path}:{number}: code fence not closed")
            words = fence["info"].strip().lstrip("{.").split()
            is_python = bool(words) and words[0].rstrip("}").lower() in PYTHON
            if skip and not is_python:
                raise DocBlockError(
                    f"{path}:{skip[0]}: skip comment before a block that is not Python"
                )
            if skip:
                page.skipped.append(skip)
            elif is_python:
                body = _unindent(lines[i + 1 : end], len(fence["indent"]))
                page.blocks.append(Block(path, number + 1, "\n".join(body), "code"))
            skip, i = None, end
        i += 1
    if skip:
        raise DocBlockError(f"{path}:{skip[0]}: skip comment not before a block")
    return page


def parse_docstring(obj, name: str) -> Page:
    """The blocks of the `Example:`/`Examples:` section of `obj`'s docstring."""
    doc = inspect.getdoc(obj) or ""
    path, first = name, 1
    try:  # Point at the docstring in its source file when it is found.
        obj = inspect.unwrap(obj)  # a @contextmanager's source is its function's
        source, start = inspect.getsourcelines(obj)
        quote = next(k for k, s in enumerate(source) if '"""' in s or "'''" in s)
        raw = (obj.__doc__ or "").split("\n")
        blank = next((k for k, s in enumerate(raw) if s.strip()), 0)
        path = os.path.relpath(inspect.getsourcefile(obj))
        first = max(start, 1) + quote + blank
    except (OSError, TypeError, StopIteration):
        pass
    lines = doc.splitlines()
    begin = next(
        (k for k, s in enumerate(lines) if s in ("Example:", "Examples:")), None
    )
    if begin is None:
        return Page(path)
    end, in_fence = len(lines), False
    for k in range(begin + 1, len(lines)):
        in_fence ^= bool(FENCE.match(lines[k]))
        if not in_fence and SECTION.match(lines[k]):
            end = k
            break
    section = "\n".join(lines[begin + 1 : end])
    return parse_markdown(section, path, first_line=first + begin + 1)


def _expand_snippets(source: str, base_dir: str) -> str:
    """Inlines `--8<-- "path"` lines (paths relative to `base_dir`)."""

    def inline(m):
        with open(os.path.join(base_dir, m["path"]), encoding="utf-8") as f:
            return textwrap.indent(f.read().rstrip("\n"), m["indent"])

    return "\n".join(SNIPPET.sub(inline, ln) for ln in source.split("\n"))


def run_page(page: Page, workdir, globs: dict | None = None, base_dir=".") -> dict:
    """Runs the page's blocks in one namespace, in `workdir`; returns it.

    Keras's global state is reset before and after (session, seed, dtype
    policy, distribution); the working directory is restored.
    """
    import keras

    __tracebackhide__ = True  # pytest shows the block's traceback, not ours
    namespace = {"__name__": "__main__", **(globs or {})}
    cwd = os.getcwd()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    try:
        os.chdir(workdir)
        for block in page.blocks:
            source = _expand_snippets(block.source, os.path.join(cwd, base_dir))
            filename = f"{block.path}:{block.line}"
            lines = source.splitlines(keepends=True)  # for tracebacks' source lines
            linecache.cache[filename] = (len(source), None, lines, filename)
            try:
                exec(compile(source, filename, "exec"), namespace)
            except Exception as e:
                raise DocBlockError(_report(block, source, e)) from None
    finally:
        os.chdir(cwd)
        keras.config.set_dtype_policy("float32")
        keras.config.set_floatx("float32")
        if hasattr(keras, "distribution"):
            keras.distribution.set_distribution(None)
        keras.backend.clear_session()
    return namespace


def _report(block: Block, source: str, error: Exception) -> str:
    """The failure message: where, the block's numbered source, the traceback."""
    numbered = "\n".join(
        f"{block.line + k:5d} | {s}" for k, s in enumerate(source.split("\n"))
    )
    tb = "".join(
        traceback.format_exception(type(error), error, error.__traceback__.tb_next)
    )
    return (
        f"{block.kind} block at {block.path}:{block.line} failed "
        f"({type(error).__name__}: {error})\n{numbered}\n\n{tb}"
    )
