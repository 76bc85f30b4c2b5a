"""Griffe extension for the documentation site (mkdocs.yml, ``mkdocstrings`` → ``extensions``).

The docstrings are written for both ``help()`` and the site, so they keep Sphinx's cross-reference roles
(``:class:`LpBatchNorm```, ``:func:`~normmatters.functional.lp_batch_norm```). Markdown does not know them; this
extension turns each into a code span of the name as written (``~`` drops the dotted prefix), so the pages show
``LpBatchNorm`` instead of a literal ``:class:``.

Names that a module creates at import time (the per-norm batch-norm aliases ``L1BatchNorm2d`` …, made by
``type()`` in a loop and declared by an annotation so that static analysis sees them) have no docstring in the
source; for those the runtime object's own ``__doc__`` is used.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _role_to_code(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    if short:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _runtime_doc(obj: griffe.Object) -> str | None:
    """``__doc__`` of the object at ``obj.path`` after importing its module, or None."""
    try:
        module = importlib.import_module(obj.module.path)
    except Exception:  # noqa: BLE001 - a module that does not import simply gets no runtime docstring
        return None
    value = getattr(module, obj.name, None)
    if inspect.isclass(value) or inspect.isfunction(value):
        return inspect.getdoc(value)
    return None


class SphinxRolesToCode(griffe.Extension):
    """Rewrite Sphinx roles as code spans; give import-time names their runtime docstring."""

    def on_package(self, *, pkg: griffe.Module, loader: Any, **kwargs: Any) -> None:
        self._walk(pkg)

    def _walk(self, obj: griffe.Object) -> None:
        # a bare annotation (no value) at module level: a name the module creates at import time
        if (obj.docstring is None and obj.is_attribute and obj.value is None and obj.parent is not None
                and obj.parent.is_module):
            doc = _runtime_doc(obj)
            if doc:
                obj.docstring = griffe.Docstring(doc, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_role_to_code, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member)
