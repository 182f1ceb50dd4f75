"""`make install` checks the Python version before it makes the venv (macOS's own python3 is
3.9; pyproject wants >= 3.10). Fake interpreters stand in: nothing is installed."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def fake_python(folder, version: str, name: str = "python3"):
    """A script that answers the version query with `version`, logs its arguments, and
    fails anything else (so `-m venv` is seen, and installs nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/sh\necho "$*" >> "{folder}/calls"\n'
                    f'case "$*" in *version_info*) echo {version}; exit 0;; esac\nexit 1\n')
    path.chmod(0o755)
    return path


def make_install(tmp_path, *args, uname: str | None = None):
    env = dict(os.environ)
    if uname:  # pretend to be another system: `uname -s` answers this
        bin_ = tmp_path / "bin"
        bin_.mkdir(exist_ok=True)
        (bin_ / "uname").write_text(f"#!/bin/sh\necho {uname}\n")
        (bin_ / "uname").chmod(0o755)
        env["PATH"] = f"{bin_}{os.pathsep}{env['PATH']}"
    return subprocess.run(["make", "--no-print-directory", "install", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def calls(python) -> str:
    log = python.parent / "calls"
    return log.read_text() if log.exists() else ""


@pytest.mark.parametrize("system, hint", [
    ("Darwin", "brew install python@3.12, then make install PYTHON=python3.12"),
    ("Linux", "install Python 3.10 or newer (e.g. python3.12 from your distribution), then "
              "make install PYTHON=python3.12")])
def test_old_python_is_refused_with_what_to_install(tmp_path, system, hint):
    python = fake_python(tmp_path / "py", "3.9")
    venv = tmp_path / "venv"
    proc = make_install(tmp_path, f"PYTHON={python}", f"VENV={venv}", uname=system)
    assert proc.returncode != 0
    assert (f"pipeline needs Python >= 3.10 (found 3.9 at {python}): {hint}"
            in proc.stderr.splitlines())
    assert not venv.exists() and "venv" not in calls(python)  # stopped before the venv


def test_interpreter_found_on_the_path(tmp_path):
    python = fake_python(tmp_path / "py", "3.9", name="python3.9")
    env_path = f"{python.parent}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(["make", "install", "PYTHON=python3.9", f"VENV={tmp_path / 'venv'}"],
                          cwd=ROOT, env=dict(os.environ, PATH=env_path), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert f"(found 3.9 at {python})" in proc.stderr


def test_missing_interpreter(tmp_path):
    proc = make_install(tmp_path, "PYTHON=python3.99-not-here", f"VENV={tmp_path / 'venv'}")
    assert proc.returncode != 0
    assert "pipeline needs Python >= 3.10 (no python3.99-not-here found):" in proc.stderr


def test_venv_made_by_an_old_python(tmp_path):
    venv = tmp_path / "venv"
    python = fake_python(venv / "bin", "3.9", name="python")
    proc = make_install(tmp_path, f"VENV={venv}")
    assert proc.returncode != 0
    assert (f"pipeline needs Python >= 3.10 ({venv} was made with 3.9): rm -rf {venv}, then "
            f"make install PYTHON=python3.12" in proc.stderr)
    assert calls(python).count("\n") == 1  # asked for its version, nothing else


@pytest.mark.parametrize("version", ["3.10", "3.12", "3.13"])
def test_new_enough_python_goes_on_to_make_the_venv(tmp_path, version):
    python = fake_python(tmp_path / "py", version)
    proc = make_install(tmp_path, f"PYTHON={python}", f"VENV={tmp_path / 'venv'}")
    assert "pipeline needs Python" not in proc.stderr
    assert "-m venv" in calls(python)  # the fake refuses it, so make stops there
    assert proc.returncode != 0
