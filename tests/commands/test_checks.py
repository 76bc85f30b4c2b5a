"""The validation layer of every command (normmatters.commands.checks): each flag's declared constraint, the
constraints between flags, one line on stderr and exit 2 for every bad setting, before any work starts."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normmatters import cli
from normmatters.commands import checks as K


def _code(argv: list[str]) -> int:
    """main's exit code: it returns it for a flag refused by its own type too (argparse's SystemExit caught)."""
    return cli.main(argv)


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Every command's work replaced by a recorder (parsing and checking run for real), in a scratch folder."""
    ran = []
    for module in cli.COMMANDS.values():
        mod = importlib.import_module(f"normmatters.commands.{module}")
        monkeypatch.setattr(mod, "run", lambda args, _m=module: ran.append((_m, args)) or 0)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    return ran


# ---- the cases of issue 24, each refused with one line naming the flag -------------------------------------------

CASES = [
    (["constants", "--n", "0"], "--n"), (["constants", "--n", "-5"], "--n"), (["constants", "--n", "1"], "--n"),
    (["constants", "--n", "1e15"], "--n"), (["constants", "--n", "1000000000000000"], "--n"),
    (["constants", "--k", "0"], "--k"), (["compare", "--quick", "--device", "bogus"], "--device"),
    (["compare", "--quick", "--out", "a-file"], "--out"), (["compare", "--out", "/proc/x"], "--out"),
    (["compare", "--seeds", "0"], "--seeds"), (["compare", "--lr", "nan"], "--lr"),
    (["compare", "--norms", "l3"], "--norms"), (["compare", "--model", "bogus"], "--model"),
    (["compare", "--dataset", "garbage"], "--dataset"), (["reproduce", "weight-decay", "--epochs", "-1"], "--epochs"),
    (["reproduce", "weight-decay", "--lr", "nan"], "--lr"),
    (["reproduce", "weight-decay", "--weight-decay", "-1"], "--weight-decay"),
    (["reproduce", "weight-decay", "--milestones", "0"], "--milestones"),
    (["reproduce", "weight-decay", "--milestones", "5", "3"], "--milestones"),
    (["reproduce", "weight-norm", "--dataset", "garbage"], "--dataset"),
    (["reproduce", "weight-norm", "--model", "bogus"], "--model"),
    (["reproduce", "layer-norm", "--corpus", "missing"], "--corpus"),
    (["reproduce", "layer-norm", "--corpus", "a-folder"], "--corpus"),
    (["reproduce", "layer-norm", "--context", "0"], "--context"),
    (["reproduce", "layer-norm", "--context", "1000000000"], "--context"),
    (["reproduce", "layer-norm", "--context", "1e9"], "--context"),
    (["reproduce", "layer-norm", "--batch", "-1"], "--batch"),
    (["reproduce", "layer-norm", "--context", "8192", "--batch", "4096"], "--context"),  # 26 TB of attention
    (["reproduce", "layer-norm", "--scale", "nan"], "--scale"),
    (["reproduce", "layer-norm", "--scale", "0"], "--scale"),
    (["reproduce", "layer-norm", "--emulate", "x"], "--emulate"),
    (["reproduce", "layer-norm", "--variants", "bogus"], "--variants"),
    (["reproduce", "layer-norm", "--eval-every", "0"], "--eval-every"),
    (["reproduce", "layer-norm", "--epochs", "3"], "--epochs"), (["reproduce", "weight-norm", "--lr", "0.1"], "--lr"),
    (["reproduce", "weight-decay", "--steps", "5"], "--steps"),  # a flag the study would ignore
    (["reproduce", "layer-norm", "--out", "a-file"], "--out"), (["reproduce", "bogus"], "study"),
    (["precision", "--formats", "fp7"], "--formats"), (["precision", "--norms", "l3"], "--norms"),
    (["precision", "--dists", "bogus"], "--dists"),
    (["precision", "--scale-min", "5", "--scale-max", "1"], "--scale-min"),
    (["precision", "--n-min", "9", "--n-max", "8"], "--n-min"), (["precision", "--scale-step", "0"], "--scale-step"),
    (["precision", "--n-min", "0"], "--n-min"), (["precision", "--eps", "-1"], "--eps"),
    (["precision", "--eps", "nan"], "--eps"), (["precision", "--threshold", "-1"], "--threshold"),
    (["precision", "--train", "--epochs", "-1"], "--epochs"), (["precision", "--out", "a-file"], "--out"),
    (["bench", "--rounds", "-1"], "--rounds"), (["bench", "--rounds", "0"], "--rounds"),
    (["bench", "--norms", "l3"], "--norms"), (["bench", "--device", "bogus"], "--device"),
    (["train", "--out", "o", "--lr", "nan"], "lr"), (["train", "--out", "o", "--epochs", "x"], "--epochs"),
]


@pytest.mark.parametrize(("argv", "flag"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_issue_cases_are_refused_with_one_line(no_work, capsys, argv, flag):
    assert _code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"{argv[0]}: ") and flag in err and re.search("expected|must be|choose from", err), err
    assert no_work == []


def test_cuda_refused_on_a_machine_without_it(no_work, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _code(["compare", "--device", "cuda"]) == 2
    assert "compare: argument --device: expected cpu (CUDA is not available on this machine), got 'cuda'" in \
        capsys.readouterr().err


def test_valid_settings_reach_the_work_with_their_types(no_work):
    assert _code(["precision", "--quick", "--eps", "1e-5", "--out", "P"]) == 0
    assert _code(["reproduce", "layer-norm", "--context", "16", "--scale", "2"]) == 0
    assert _code(["reproduce", "weight-decay", "--milestones", "1", "2", "--dataset", "digits"]) == 0
    (_, p), (_, r), (_, w) = no_work
    assert p.eps == 1e-5 and p.out.is_dir() and r.context == 16 and r.scale == [2.0] and r.out.is_dir()
    assert w.milestones == [1, 2]


def test_read_only_out_folder_refused(no_work, capsys, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)  # tests may run as root: os.access says yes
    assert _code(["compare", "--out", "ro"]) == 2
    assert "compare: --out: expected a folder we can write to (Permission denied), got 'ro'" in capsys.readouterr().err


# ---- the flag types --------------------------------------------------------------------------------------------


def test_types_accept_and_refuse():
    assert K.int_in(2, 5)("3") == 3 and K.number(0, lo_open=True)("1e-3") == 1e-3
    for fn, bad in ((K.int_in(2, 5), "6"), (K.int_in(1), "1.5"), (K.number(0), "nan"), (K.number(0), "inf"),
                    (K.number(0, lo_open=True), "0"), (K.number(hi=1, hi_open=True), "1"), (K.one_of("ab"), "c")):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"expected .*, got '{re.escape(bad)}'"):
            fn(bad)


def test_a_new_flag_declares_its_constraint_once():
    """The layer is the declaration: any parser built with these types refuses a bad value in one line."""
    p = K.Parser(prog="normmatters demo")
    p.add_argument("--width", type=K.int_in(1, 64), default=8)
    assert p.parse_args(["--width", "3"]).width == 3
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--width", "0"])
    assert e.value.code == 2


# ---- every flag of every command, random values: it runs, or exits 2 with one line and no traceback ---------------

_TOKENS = ["0", "-1", "-5", "1", "2", "3", "7", "64", "1e9", "1e15", "nan", "inf", "-inf", "0.5", "-0.0", "1e300",
           "", " ", "abc", "l1", "l2", "l3", "linf", "topk", "range", "mean", "bn", "none", "fp16", "fp7", "int8",
           "cpu", "cuda", "cuda:7", "bogus", "digits", "idx:missing", "folder:a-folder", "mlp", "resnet8", "lstm",
           "gaussian", "relu", "sgd", "adamw", "LpLayerNorm l1", "nn.LayerNorm", "a-file", "a-folder", "missing",
           "new-folder", "/proc/x", "k=5", "kk=5", "online", "pairwise"]
_VALUE = st.one_of(st.sampled_from(_TOKENS), st.integers(-10**16, 10**16).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8))


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@st.composite
def _argv(draw: st.DrawFn) -> list[str]:
    parsers = _subparsers()
    name = draw(st.sampled_from(sorted(parsers)))
    argv = [name]
    flags = [a for a in parsers[name]._actions if a.option_strings and "--help" not in a.option_strings]
    for a in parsers[name]._actions:
        if not a.option_strings and a.choices:  # a positional (reproduce's study): mostly a valid one
            argv.append(draw(st.one_of(st.sampled_from(sorted(a.choices)), _VALUE)))
    if name == "train":
        argv += ["--out", draw(st.sampled_from(["o", "a-file", "a-folder"]))]
    for a in draw(st.lists(st.sampled_from(flags), max_size=4, unique_by=lambda a: a.dest)):
        argv.append(a.option_strings[-1])
        if a.nargs == 0:
            continue
        count = draw(st.integers(1, 2)) if a.nargs in ("+", "*") else 1
        argv += [draw(_VALUE) for _ in range(count)]
    return argv


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=_argv())
def test_random_flags_run_or_are_refused_in_one_line(no_work, capsys, argv):
    code = _code(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, (argv, err)
    if code != 0:
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"{argv[0]}: "), (argv, code, err)
    else:
        assert no_work and no_work.pop()[0] == argv[0], argv


def test_leftover_arguments_are_refused_by_the_command_itself(capsys):
    # found by the property test: an extra value after a flag was refused by the top-level parser
    assert cli.main(["constants", "--n", "2", "-1e+16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("constants: unrecognized arguments: -1e+16") and err.count("\n") == 1

