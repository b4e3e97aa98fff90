"""Fixtures shared by the training-core tests: a synthetic corpus and a prepared builtin cache."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def synthetic_documents(count, seed=0):
    """Zipf-distributed made-up words: varied enough for a 4096-token BPE, tiny on disk."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    return [" ".join(rng.choices(words, weights=weights, k=rng.randint(20, 200))) + "." for _ in range(count)]


SMOKE_TRAIN_TOKENS = 4 * 2**13  # four steps of train.py's cpu batch


def run_prepare(cache, *args, timeout=300):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """The offline corpus prepared once for the cpu profile, with a short budget (4 steps of the
    cpu batch; the time budget bounds the runs before a baseline is measured) and eval."""
    cache = tmp_path_factory.mktemp("builtin-cache")
    result = run_prepare(cache, "--dataset", "builtin", "--profile", "cpu", "--time-budget", "5",
                         "--train-tokens", str(SMOKE_TRAIN_TOKENS), "--eval-tokens", str(16 * 256))
    assert result.returncode == 0, result.stderr
    return cache


def copy_project(tmp_path):
    """A fresh git repository holding this project's prepare.py, train.py and scripts/: the
    starting point of a research session, for tests that run the real helpers end to end."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("prepare.py", "train.py", ".gitignore"):
        shutil.copy(ROOT / name, repo)
    shutil.copytree(ROOT / "scripts", repo / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    for command in (["init", "-q", "-b", "main"], ["config", "user.name", "Test"],
                    ["config", "user.email", "test@example.com"], ["add", "-A"], ["commit", "-q", "-m", "start"]):
        subprocess.run(["git", *command], cwd=repo, check=True, capture_output=True)
    return repo


def client_binary(name, label, require_variable):
    """node_modules/.bin/<name> (pinned in package-lock.json) as a string; skips the test when it
    is missing, unless `require_variable` is 1 (as .ci/run sets it), where that is a failure."""
    path = ROOT / "node_modules" / ".bin" / name
    if not path.exists():
        message = f"the {label} CLI is not installed ({path}): run `npm install`"
        if os.environ.get(require_variable) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return str(path)
