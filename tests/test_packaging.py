"""Packaging: no generic top-level `cli`/`plugins`, every subpackage listed, CLI basics."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import cryowae

from .conftest import invoke_cli, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "cryowae").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"
    assert conf["package-dir"]["cryowae.cli"] == "cli"
    assert conf["package-dir"]["cryowae.plugins"] == "plugins"


@pytest.mark.slow
def test_wheel_has_no_generic_top_level_modules(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("cryowae-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"cryowae"}, tops
    assert "cryowae/cli/main.py" in names
    assert "cryowae/plugins/napari.yaml" in names
    assert "cryowae/configs/cpu-small.yaml" in names


def test_version_and_help_list_every_command():
    """A real process through the installed entry point's module."""
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"cryowae {cryowae.__version__}"
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("simulate", "evaluate", "train", "restore", "sample", "restore-batch",
                "view", "data"):
        assert cmd in res.stdout, cmd


def test_unknown_option_is_one_line_exit_2():
    res = invoke_cli("train", "x.mrc", "--no-such-option")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "no-such-option" in res.stderr


def test_a_missing_command_module_is_an_error(monkeypatch):
    """No "not built in this version" skip: a command module that does not import
    fails loudly instead of vanishing from the CLI."""
    import cryowae.cli.main as cli_main

    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("no_such_command",))
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        cli_main._register_all()
