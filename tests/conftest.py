"""Fixtures shared by the training-core tests: a synthetic corpus and a prepared builtin cache."""

import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repos import commit_new_repository

ROOT = Path(__file__).resolve().parent.parent


# The files that take longest, longest first (wall seconds in one suite run on the 2-core box,
# 2026-12-07: Ray 109, DDP 93, SLURM 57, tracking 42, the sandbox 41, train 38 ...). pytest-xdist
# hands whole files to its workers in collection order (`--no-loadscope-reorder` in pyproject.toml;
# its default orders files by their number of tests, which sent the 30 s single-test gpu_check file
# out last, to run alone while the other workers sat idle). Files not named here follow, in their
# usual order: the files of a few seconds, which fill the last gaps, so that no worker runs a 15 s
# file alone at the end. The order only decides which worker starts what first: every test still runs.
LONGEST_FIRST = ["test_lanes_ray.py", "test_ddp.py", "test_lanes_slurm.py", "test_referee_gpu_check.py",
                 "test_tracking.py", "test_containment_sandbox.py", "test_train.py", "test_loop_real_train.py",
                 "test_golf.py", "test_referee_artifact.py", "test_prepare.py", "test_search.py", "test_loop.py",
                 "test_loop_resume.py", "test_helpers_cli.py", "test_codex_cli.py", "test_loop_agents.py",
                 "test_helpers_trust.py", "test_opencode_cli.py", "test_lanes.py", "test_claude_cli.py",
                 "test_task_external.py", "test_referee_flex.py", "test_referee_probe.py", "test_helpers_referee_real.py"]


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def synthetic_documents(count, seed=0):
    """Zipf-distributed made-up words: varied enough for a 4096-token BPE, tiny on disk."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    return [" ".join(rng.choices(words, weights=weights, k=rng.randint(20, 200))) + "." for _ in range(count)]


SMOKE_TRAIN_TOKENS = 2 * 2**13  # two steps of train.py's cpu batch


def run_prepare(cache, *args, timeout=300):
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """The offline corpus prepared once for the cpu profile, with a short budget (2 steps of the
    cpu batch; the time budget bounds the runs before a baseline is measured) and eval. Once per
    run: pytest-xdist's workers share one copy (the first to take the lock prepares it); the tests
    only read it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this run's folder, above each worker's own
    cache = shared / "builtin-cache"
    with open(shared / "builtin-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / "prepared" / "prepared.json").exists():  # written last: a complete cache
            result = run_prepare(cache, "--dataset", "builtin", "--profile", "cpu", "--time-budget", "5",
                                 "--train-tokens", str(SMOKE_TRAIN_TOKENS), "--eval-tokens", str(16 * 256))
            assert result.returncode == 0, result.stderr
    return cache


def manifest_view(cache, folder, **changes):
    """A cache in `folder` whose prepared files are links to `cache`'s and whose manifest is its own
    with `changes`: the data prepare.py would write again, under another budget or profile."""
    (folder / "prepared").mkdir(parents=True)
    for item in (cache / "prepared").iterdir():
        if item.name != "prepared.json":
            (folder / "prepared" / item.name).symlink_to(item)
    manifest = json.loads((cache / "prepared" / "prepared.json").read_text())
    (folder / "prepared" / "prepared.json").write_text(json.dumps(dict(manifest, **changes)))
    return folder


def copy_project(tmp_path):
    """A fresh git repository holding this project's prepare.py, train.py and scripts/: the
    starting point of a research session, for tests that run the real helpers end to end."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("prepare.py", "train.py", ".gitignore"):
        shutil.copy(ROOT / name, repo)
    shutil.copytree(ROOT / "scripts", repo / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    commit_new_repository(repo)
    return repo


def pid_gone(pid):
    """Gone, or a zombie waiting for init to reap it (it holds no resources)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


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
