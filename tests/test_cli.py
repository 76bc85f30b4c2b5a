import subprocess
import sys

from normmatters.cli import main


def test_constants_command(capsys):
    assert main(["constants", "--n", "64", "1024"]) == 0
    out = capsys.readouterr().out
    assert "| linf | 1024 |" in out and "| range | 64 |" in out


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "normmatters", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "constants" in r.stdout
