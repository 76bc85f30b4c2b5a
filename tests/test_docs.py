"""The documentation site (mkdocs.yml, docs/): the strict build passes with no warning, and every public name of
``normmatters`` has its entry in the API reference (an HTML id that is the name or ends with ``.<name>``)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

import normmatters as nm

pytest.importorskip("mkdocs", reason="mkdocs is not installed (the test extra brings it)")
pytest.importorskip("material", reason="mkdocs-material is not installed (the test extra brings it)")
pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is not installed (the test extra)")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path: pathlib.Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    src = str(ROOT / "src")  # the hook imports the package: the one under test, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, out


def test_strict_build_has_no_warning(site):
    proc, _ = site
    log = proc.stdout + proc.stderr
    problems = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert proc.returncode == 0 and not problems, f"mkdocs build --strict failed:\n{log[-3000:]}"


def test_every_public_name_has_an_api_entry(site):
    proc, out = site
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = "".join(p.read_text(errors="ignore") for p in out.rglob("*.html"))
    ids = set(re.findall(r'id="([\w.]+)"', text))
    missing = [name for name in nm.__all__ if not any(i == name or i.endswith("." + name) for i in ids)]
    assert not missing, f"{len(missing)} public names without an API entry: {missing}"


def test_an_unclaimed_public_name_lands_in_the_catch_all(monkeypatch):
    """A name no API page claims (a new module, a moved one) is documented on the catch-all, at its definition."""
    hook = _load(ROOT / "docs" / "hooks" / "api_reference.py")
    fake = types.ModuleType("normmatters.brand_new")

    def brand_new_function(x):
        """Does something new."""

    brand_new_function.__module__ = fake.__name__
    fake.brand_new_function = brand_new_function
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(hook, "_public", lambda: [("brand_new_function", "normmatters.brand_new.brand_new_function",
                                                   False), ("LpBatchNorm2d", "normmatters.nn.batchnorm.LpBatchNorm2d",
                                                            False)])
    monkeypatch.setattr(hook, "_claims", {"normmatters.nn": "api/layers.md", "*": "api/index.md"})
    rest = hook._expand_public(["*"])
    assert "::: normmatters.brand_new.brand_new_function" in rest and "LpBatchNorm2d" not in rest
    layers = hook._expand_public(["normmatters.nn"])
    assert "::: normmatters.nn.batchnorm.LpBatchNorm2d" in layers and "brand_new" not in layers
    assert hook._target(fake, "brand_new_function") == ("normmatters.brand_new.brand_new_function", False)


def test_sphinx_roles_become_code_spans():
    ext = _load(ROOT / "docs" / "hooks" / "griffe_docstrings.py")
    text = "see :class:`LpBatchNorm` and :func:`~normmatters.functional.lp_batch_norm`, :mod:`normmatters.nn`"
    assert ext._ROLE.sub(ext._role_to_code, text) == "see `LpBatchNorm` and `lp_batch_norm`, `normmatters.nn`"


def test_the_weight_decay_guide_example_runs_as_written(capsys):
    """The guide says its complete training-loop example runs as written: run it."""
    page = (ROOT / "docs" / "guides" / "weight-decay.md").read_text()
    section = page[page.index("### Your own loop"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "__docs_example__"}
    exec(compile(code, "docs/guides/weight-decay.md", "exec"), namespace)  # noqa: S102 - our own page
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and all("effective_lr" in line for line in printed)
    assert namespace["monitor"].history and namespace["mimic"].steps == 20
