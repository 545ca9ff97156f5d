"""What a user installs: metadata, the license, typing marker, and an sdist that can run its own tests."""

import configparser
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg():
    c = configparser.ConfigParser()
    c.read(os.path.join(ROOT, "setup.cfg"))
    return c


def test_metadata_license_urls_classifiers_and_python_claim():
    c = _cfg()
    meta = c["metadata"]
    assert meta["name"] == "foldkit-onnx" and meta["license"] == "Apache-2.0"
    assert "Apache License" in open(os.path.join(ROOT, "LICENSE")).read(2000)
    assert "Homepage" in meta["project_urls"]
    assert "Programming Language :: Python :: 3.11" in meta["classifiers"]
    assert c["options"]["python_requires"] == ">=3.11"
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "Python 3.11+" in readme and "3.9" not in readme.split("## What a run looks like")[0]
    assert os.path.isfile(os.path.join(ROOT, "foldkit", "py.typed"))
    assert re.search(r"^foldkit = py\.typed$", open(os.path.join(ROOT, "setup.cfg")).read(), re.M)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_sdist_ships_the_tests_with_every_helper_they_import(tmp_path):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for f in files:
        if os.path.exists(os.path.join(ROOT, f)):
            os.makedirs(src / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), src / f)
    r = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "sdist", "-d",
                        str(tmp_path / "dist")], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (sdist,) = os.listdir(tmp_path / "dist")
    with tarfile.open(tmp_path / "dist" / sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    shipped_tests = {n for n in names if n.startswith("tests/")}
    assert "LICENSE" in names and "foldkit/py.typed" in names
    for n in shipped_tests:  # every module a shipped test imports from tests/ or models/ ships too
        if n.endswith(".py"):
            text = open(src / n).read()
            for mod in re.findall(r"^\s*(?:from|import) ((?:tests|models)(?:\.\w+)*)", text, re.M):
                path = mod.replace(".", "/")
                assert f"{path}.py" in names or f"{path}/__init__.py" in names, (n, mod)
    assert not any("__pycache__" in n for n in names)
