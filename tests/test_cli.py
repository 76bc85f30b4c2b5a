import subprocess
import sys

import pytest

from normmatters.cli import main


def test_constants_command(capsys):
    assert main(["constants", "--n", "64", "1024"]) == 0
    out = capsys.readouterr().out
    assert "| linf | 1024 |" in out and "| range | 64 |" in out


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "normmatters", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "constants" in r.stdout


def test_help_imports_no_torch():
    code = ("import sys, normmatters.cli as c; p = c.build_parser(); "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr


def test_every_subcommand_has_a_description_and_every_flag_its_default():
    import argparse

    from normmatters.cli import HelpFormatter, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.description and len(p.description) > 40, name
        assert p.formatter_class is HelpFormatter
        for a in p._actions:
            if a.option_strings and "--help" not in a.option_strings:
                shown = HelpFormatter("x")._get_help_string(a) or ""
                assert "default" in shown or "required" in shown or a.default is False, (name, a.option_strings)


def test_reproduce_help_states_each_study_default():
    import argparse

    from normmatters.cli import build_parser
    from normmatters.experiments.weight_decay import WeightDecayStudy
    from normmatters.experiments.weight_norm_study import WeightNormStudy

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["reproduce"].format_help().split())
    assert f"weight-decay {WeightDecayStudy().model}" in text and f"weight-norm {WeightNormStudy().cnn_model}" in text
    assert f"weight-decay {WeightDecayStudy().epochs}" in text and f"weight-norm {WeightNormStudy().cnn_epochs}" in text


def test_lazy_package_exports():
    import normmatters as nm

    assert "LpBatchNorm2d" in nm.__all__ and "lp_batch_norm" in dir(nm)
    assert nm.LpBatchNorm2d.__module__ == "normmatters.nn.batchnorm"
    assert nm.functional.lp_batch_norm is nm.lp_batch_norm
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nm.nope  # noqa: B018


def test_a_write_past_the_file_size_limit_exits_1_in_one_line_and_keeps_the_old_file(tmp_path):
    """main ignores SIGXFSZ (whose default action kills the process mid-write), so the write fails with EFBIG,
    the atomic writer keeps the previous file, and the command ends with one line, exit 1, no traceback."""
    p = tmp_path / "precision.csv"
    p.write_bytes(b"the previous table\n")
    code = (
        "import resource, sys\n"
        "from normmatters import cli\n"
        "from normmatters.atomic_write import atomic_write\n"
        "import normmatters.commands.constants as c\n"
        f"c.run = lambda args: atomic_write({str(p)!r}, b'x' * 8192) and 0\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))\n"
        "sys.exit(cli.main(['constants']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.startswith("constants: no space left while writing") and r.stderr.count("\n") == 1, r.stderr
    assert "previous precision.csv is intact" in r.stderr and "Traceback" not in r.stderr
    assert p.read_bytes() == b"the previous table\n" and [x.name for x in tmp_path.iterdir()] == ["precision.csv"]


def test_bad_data_found_while_working_is_one_line_exit_2(monkeypatch, capsys):
    from normmatters.commands import constants

    def bad(args):
        raise ValueError("dataset x: not a folder\nsecond line")

    monkeypatch.setattr(constants, "run", bad)
    assert main(["constants"]) == 2
    assert capsys.readouterr().err == "constants: dataset x: not a folder second line\n"
