"""The documentation: its code runs, the API reference is complete, it builds.

The Python blocks of README.md and docs/**/*.md run (see doc_blocks.py for
the comment syntax), as do the `Example:` blocks of every public name's
docstring. Those run once, on TensorFlow; a page declaring
`<!-- doc-test: backend jax: ... -->` runs on JAX instead.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import types

import doc_blocks
import keras
import numpy as np
import pytest
import yaml
from test_docs_site import site_build  # noqa: F401  (the shared build)

import keras_ema
from keras_ema import holder

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
ONCE = (
    "the documentation's blocks are run once, on the default backend; "
    "the JAX guide declares its own backend"
)
TF_ONLY = pytest.mark.backend("tensorflow", reason=ONCE)


def markdown_params():
    """README.md and the docs pages with code to run, each marked with the
    backend it runs on (a page the runner cannot parse fails in the test)."""
    params = []
    for path in [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]:
        rel = path.relative_to(REPO).as_posix()
        try:
            page = doc_blocks.parse_markdown(path.read_text(encoding="utf-8"), rel)
        except doc_blocks.DocBlockError:
            page = None
        if page is not None and not (page.blocks or page.skipped or page.backend):
            continue
        mark = TF_ONLY
        if page is not None and page.backend:
            mark = pytest.mark.backend(page.backend[0], reason=page.backend[1])
        params.append(pytest.param(rel, marks=mark, id=rel))
    return params


def public_names() -> dict[str, object]:
    """Every public name, as "Name" or "module.Name": `keras_ema.__all__`,
    the `__all__` of its submodules, and `holder.WeightHolder`. A submodule's
    name that is also a top-level name is listed once, at the top."""
    names = {}
    for name in keras_ema.__all__:
        names[name] = getattr(keras_ema, name)
    top = {id(obj) for obj in names.values()}
    for name, module in list(names.items()):
        if isinstance(module, types.ModuleType):
            for sub in getattr(module, "__all__", None) or fallback_all(module):
                if id(getattr(module, sub)) not in top:
                    names[f"{name}.{sub}"] = getattr(module, sub)
    names["holder.WeightHolder"] = holder.WeightHolder
    return names


def fallback_all(module) -> list[str]:
    """A module's public classes and functions, when it has no `__all__`."""
    return [
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    ]


def api_names() -> set[str]:
    return {n for n, obj in public_names().items() if not inspect.ismodule(obj)}


@pytest.mark.parametrize("path", markdown_params())
def test_markdown_blocks(path, tmp_path):
    page = doc_blocks.parse_markdown((REPO / path).read_text(encoding="utf-8"), path)
    doc_blocks.run_page(page, tmp_path, base_dir=REPO)


@TF_ONLY
@pytest.mark.parametrize("name", sorted(public_names()))
def test_docstring_examples(name, tmp_path):
    obj = public_names()[name]
    doc = inspect.getdoc(obj)
    assert doc, f"keras_ema.{name} has no docstring"
    sections = set(doc.splitlines())
    page = doc_blocks.parse_docstring(obj, f"keras_ema.{name}")
    problems = []
    if inspect.ismodule(obj):
        if not hasattr(obj, "__all__"):
            problems.append("the module has no __all__")
    else:
        if not sections & {"Example:", "Examples:"} or not page.blocks + page.skipped:
            problems.append("no 'Example:' section with a ```python block")
        signature = inspect.signature(obj)
        if [p for p in signature.parameters if p != "self"] and "Args:" not in sections:
            problems.append(f"no 'Args:' section for {signature}")
        if "raise " in _own_source(obj) and "Raises:" not in sections:
            problems.append("raises, but has no 'Raises:' section")
        returns = signature.return_annotation
        if (
            not inspect.isclass(obj)
            and returns not in (None, "None", type(None))
            and not sections & {"Returns:", "Yields:"}
        ):
            problems.append(f"no 'Returns:' (or 'Yields:') section for -> {returns}")
    assert not problems, f"keras_ema.{name} ({page.path}): " + "; ".join(problems)
    globs = {"keras": keras, "keras_ema": keras_ema, "np": np}
    doc_blocks.run_page(page, tmp_path, globs=globs, base_dir=REPO)


def _own_source(obj) -> str:
    """The source of a function, or of a class's `__init__` (what it raises
    for bad arguments); empty when it cannot be read."""
    target = obj.__init__ if inspect.isclass(obj) else inspect.unwrap(obj)
    try:
        return inspect.getsource(target)
    except (OSError, TypeError):
        return ""


@TF_ONLY
def test_api_reference_pages():
    """One page per public name, each rendering that name, each in the nav."""
    expected = {}
    for name in api_names():
        module, _, short = name.rpartition(".")
        page = f"api/{module}/{short}.md" if module else f"api/{short}.md"
        expected[page] = f"keras_ema.{name}"
    found = {
        p.relative_to(DOCS).as_posix()
        for p in (DOCS / "api").rglob("*.md")
        if p.relative_to(DOCS).as_posix() != "api/index.md"
    }
    missing, extra = expected.keys() - found, found - expected.keys()
    problems = [f"missing page {p} (::: {expected[p]})" for p in sorted(missing)]
    problems += [f"extra page {p}: no public name of that name" for p in sorted(extra)]
    for page in sorted(expected.keys() & found):
        text = (DOCS / page).read_text(encoding="utf-8")
        if not re.search(rf"^:::\s*{re.escape(expected[page])}\s*$", text, re.M):
            problems.append(f"{page} has no '::: {expected[page]}'")
    nav = set(nav_pages(load_mkdocs_yml()["nav"]))
    problems += [
        f"{p} is not in mkdocs.yml's nav" for p in sorted(expected.keys() - nav)
    ]
    assert not problems, "\n".join(problems)


def load_mkdocs_yml() -> dict:
    """mkdocs.yml, read with tags such as !!python/name ignored."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    with open(REPO / "mkdocs.yml", encoding="utf-8") as f:
        return yaml.load(f, Loader=Loader)


def nav_pages(nav):
    """The page paths of a mkdocs nav (nested lists and dicts)."""
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from nav_pages(item)
    elif isinstance(nav, dict):
        for item in nav.values():
            yield from nav_pages(item)


@TF_ONLY
def test_readme_is_a_front_page():
    length = len((REPO / "README.md").read_text(encoding="utf-8"))
    assert length < 10_000, (
        f"README.md has {length} characters (limit 10,000): move details to docs/"
    )


@TF_ONLY
def test_mkdocs_build_strict(site_build):  # noqa: F811
    assert site_build.returncode == 0, (
        f"mkdocs build --strict failed ({site_build.returncode}):\n{site_build.output}"
    )
