"""``normmatters constants`` (normmatters.commands.constants): the sizes and k it is given reach the table, whose
constants are the estimator registry's."""

from normmatters.cli import main
from normmatters.estimators import available_norms, get_estimator


def _rows(out):
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| norm")]


def test_sizes_and_k_reach_the_table(capsys):
    assert main(["constants", "--n", "32", "100", "--k", "4"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert {(r[0], int(r[1])) for r in rows} == {(norm, n) for norm in available_norms()
                                                 if get_estimator(norm).divides for n in (32, 100)}
    for norm, n, c, *_ in rows:
        assert float(c) == round(get_estimator(norm).constant(int(n), k=4), 6), (norm, n)


def test_default_sizes(capsys, monkeypatch):
    from normmatters import report_constants

    seen = []
    monkeypatch.setattr(report_constants, "constants_table", lambda ns, k: seen.append((ns, k)) or "table")
    assert main(["constants"]) == 0
    assert seen == [([64, 1024, 65536], 10)] and capsys.readouterr().out == "table\n"
