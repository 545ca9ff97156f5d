"""The shipped pre-commit hook, run for real by pre-commit on a throwaway git repository."""

import os
import shutil
import subprocess
import sys

import onnx
import pytest
import yaml

from tests.helpers import conv_bn_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDKIT = os.path.join(os.path.dirname(sys.executable), "foldkit")

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(FOLDKIT),
                                reason="needs git and the installed foldkit command")


def _git(repo, *args, env=None):
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)


def test_shipped_hook_blocks_a_commit_with_an_unfolded_model_and_names_both(tmp_path):
    pytest.importorskip("pre_commit")
    with open(os.path.join(ROOT, ".pre-commit-hooks.yaml")) as f:
        (hook,) = yaml.safe_load(f)
    # the shipped definition as it is (id, entry, files, types), run as a local hook so that pre-commit
    # does not build a virtualenv from the registry: the entry runs this checkout's installed command
    assert hook["entry"].split()[0] == "foldkit"
    local = dict(hook, language="system", entry=" ".join([FOLDKIT] + hook["entry"].split()[1:]))
    repo = tmp_path / "repo"
    repo.mkdir()
    env = dict(os.environ, PRE_COMMIT_HOME=str(tmp_path / "pc-home"), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@e", HOME=str(tmp_path))
    assert _git(repo, "init", "-q", env=env).returncode == 0
    (repo / ".pre-commit-config.yaml").write_text(yaml.safe_dump({"repos": [{"repo": "local", "hooks": [local]}]}))
    onnx.save(conv_bn_model(2), str(repo / "unfolded.onnx"))
    folded = subprocess.run([FOLDKIT, "fold", "unfolded.onnx", "-o", "folded.onnx", "-q"], cwd=repo,
                            capture_output=True, text=True, timeout=120)
    assert folded.returncode == 0, folded.stderr
    (repo / "README").write_text("models\n")
    pc = [sys.executable, "-m", "pre_commit"]
    r = subprocess.run(pc + ["install"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    _git(repo, "add", ".", env=env)
    commit = _git(repo, "commit", "-m", "two models", env=env)
    out = commit.stdout + commit.stderr
    assert commit.returncode != 0, out                      # blocked
    assert "unfolded.onnx" in out and "folded.onnx: ready" in out and "FK001" in out, out
    assert "unexpected extra argument" not in out
    assert _git(repo, "rev-parse", "HEAD", env=env).returncode != 0  # nothing was committed
    # once the unfolded model is replaced by its folded version, the same commit goes through
    shutil.copyfile(repo / "folded.onnx", repo / "unfolded.onnx")
    _git(repo, "add", ".", env=env)
    commit = _git(repo, "commit", "-m", "two folded models", env=env)
    assert commit.returncode == 0, commit.stdout + commit.stderr
