"""One home per norm: no source file outside the estimator registry tests a norm by its literal name.

Facts about a norm (its options, native-kernel layout, emulation step, expected statistic) are attributes or
methods of its estimator (src/normmatters/estimators/); other code asks the registry. The pattern is the one
the architecture acceptance check uses."""

import pathlib
import re

import normmatters

SRC = pathlib.Path(normmatters.__file__).parent
LITERAL = re.compile(r"""norm\s*(==|!=)\s*["']|norm\s+(not\s+)?in\s+\(["']""")


def literal_norm_tests(root: pathlib.Path) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*.py")):
        if "estimators" in path.relative_to(root).parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if LITERAL.search(line):
                hits.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    return hits


def test_no_literal_norm_tests_outside_the_registry():
    assert literal_norm_tests(SRC) == []


def test_the_scan_finds_a_literal_test(tmp_path):
    (tmp_path / "mod.py").write_text('if norm == "topk":\n    pass\nif weight_norm in ("wn", "bwn"):\n    pass\n')
    (tmp_path / "estimators").mkdir()
    (tmp_path / "estimators" / "topk.py").write_text('if norm != "topk":\n    pass\n')
    assert [h.split(":")[1] for h in literal_norm_tests(tmp_path)] == ["1", "3"]
