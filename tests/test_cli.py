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
