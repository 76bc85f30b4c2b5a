"""MkDocs hook: the API reference's entries, generated from the package's public names at build time.

The package root re-exports lazily (a module ``__getattr__``), which static analysis cannot follow, so every
public name is documented where it is defined (``normmatters.nn.batchnorm.LpBatchNorm2d``). Writing those paths by
hand would break whenever a name is added or a module moves; instead the API pages hold markers that this hook
expands into ``::: path`` blocks for mkdocstrings:

``<!-- api public: PREFIX [PREFIX ...] -->``
    every name of ``normmatters.__all__`` whose defining module starts with one of the prefixes (a name that is a
    module counts as defined by itself), in ``__all__``'s order, modules last (with the rest of their ``__all__``);
``<!-- api public: * -->``
    every name of ``normmatters.__all__`` that no other page's marker claims (at most one such marker);
``<!-- api module: MODULE -->``
    the module's docstring, then every name of ``MODULE.__all__`` at its defining module;
``<!-- api index -->``
    a table of every name of ``normmatters.__all__`` with a link to its entry.

A name added to any ``__all__`` thus appears in the reference without editing a page, and tests/test_docs.py
checks that every public name has its entry in the built site.
"""

from __future__ import annotations

import importlib
import json
import re
import types
from typing import Any

PACKAGE = "normmatters"
_MARKER = re.compile(r"^<!--\s*api\s+(public|module|index)\s*:?\s*(.*?)\s*-->[ \t]*$", re.M)

#: prefix → page claiming it (``*`` is the catch-all), filled by on_files
_claims: dict[str, str] = {}


def _target(owner: types.ModuleType, name: str) -> tuple[str, bool]:
    """(dotted path of the object ``owner.name`` where it is defined, whether it is a module)."""
    obj = getattr(owner, name)
    if isinstance(obj, types.ModuleType):
        return obj.__name__, True
    module_name = getattr(obj, "__module__", None)
    if isinstance(module_name, str) and module_name.startswith(PACKAGE):
        try:
            if getattr(importlib.import_module(module_name), name, None) is obj:
                return f"{module_name}.{name}", False
        except ImportError:
            pass
    return f"{owner.__name__}.{name}", False


def _public() -> list[tuple[str, str, bool]]:
    """(name, defining path, is a module) for every name of ``normmatters.__all__``."""
    package = importlib.import_module(PACKAGE)
    return [(name, *_target(package, name)) for name in package.__all__]


def _matches(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _owner(path: str) -> str | None:
    """The claimed prefix that covers ``path`` (the longest), ``*`` if none does and a catch-all exists."""
    best = max((p for p in _claims if p != "*" and _matches(path, p)), key=len, default=None)
    return best if best is not None else ("*" if "*" in _claims else None)


def _block(path: str, **options: Any) -> str:
    lines = [f"::: {path}"]
    if options:
        lines.append("    options:")
        lines += [f"      {key}: {json.dumps(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def _module_entry(path: str, exclude: set[str], level: int = 2) -> str:
    """A module that is itself a public name: its docstring and its ``__all__`` minus names documented apart."""
    module = importlib.import_module(path)
    members = [n for n in getattr(module, "__all__", []) if n not in exclude]
    return _block(path, members=members or False, show_root_heading=True, heading_level=level)


def _expand_public(prefixes: list[str]) -> str:
    public = _public()
    names = {name for name, _, _ in public}
    wanted = set(prefixes)
    level = 3 if "*" in wanted else 2
    blocks = []
    # the names themselves first, then the modules that are public names (with the rest of their ``__all__``)
    for _name, path, is_module in sorted(public, key=lambda entry: entry[2]):
        if _owner(path) not in wanted:
            continue
        blocks.append(_module_entry(path, names, level) if is_module else _block(path, heading_level=level))
    if "*" in wanted:  # the catch-all: names no page claims, under a heading of their own if there are any
        return "## Other public names\n\n" + "\n".join(blocks) if blocks else ""
    if not blocks:
        raise ValueError(f"api marker {' '.join(prefixes)!r}: no public name of {PACKAGE} matches it")
    return "\n".join(blocks)


def _expand_module(path: str) -> str:
    module = importlib.import_module(path)
    public_paths = {p for _, p, _ in _public()}
    blocks = [_block(path, members=False, show_root_heading=True, heading_level=2)]
    for name in getattr(module, "__all__", []):
        target, is_module = _target(module, name)
        if target in public_paths:
            continue  # documented on the page of the package's public names
        blocks.append(_module_entry(target, set(), 3) if is_module else _block(target, heading_level=3))
    return "\n".join(blocks)


def _expand_index() -> str:
    rows = ["| name | kind | defined in |", "|---|---|---|"]
    package = importlib.import_module(PACKAGE)
    for name, path, is_module in _public():
        obj = getattr(package, name)
        kind = "module" if is_module else ("class" if isinstance(obj, type) else type(obj).__name__)
        where = path if is_module else path.rsplit(".", 1)[0]
        rows.append(f"| [`{name}`][{path}] | {kind} | `{where}` |")
    return "\n".join(rows) + "\n"


def on_files(files: Any, config: Any) -> Any:
    """Collect which page claims which prefixes before any page is rendered."""
    _claims.clear()
    for file in files.documentation_pages():
        for kind, args in _MARKER.findall(file.content_string):
            if kind != "public":
                continue
            for prefix in args.split():
                if prefix in _claims:
                    raise ValueError(f"api marker: {prefix!r} is claimed by {_claims[prefix]} and {file.src_uri}")
                _claims[prefix] = file.src_uri
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def expand(match: re.Match[str]) -> str:
        kind, args = match.group(1), match.group(2).split()
        if kind == "public":
            return _expand_public(args)
        if kind == "module":
            return "\n".join(_expand_module(path) for path in args)
        return _expand_index()

    return _MARKER.sub(expand, markdown)
