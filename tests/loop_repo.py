"""A real git repository in a temporary folder for the headless-loop tests (tests/test_loop*.py).

It holds copies of the project's prepare.py, train.py, scripts/, program.md and skills/, a
prepared-data manifest for the cpu profile in its own AUTORESEARCH_CACHE (no data: training is
the fake tests/fixtures/fake_train_loop/bowl.py, whose val_bpb is a function of train.py's
settings), and runs scripts/loop.py with this Python.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from repos import commit_new_repository, write_standin_manifest

PROJECT = Path(__file__).resolve().parent.parent
FIXTURES = PROJECT / "tests" / "fixtures"
BOWL = FIXTURES / "fake_train_loop" / "bowl.py"
AGENTS = FIXTURES / "fake_agents"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"


class LoopRepo:
    def __init__(self, path, cache=None, copy=("prepare.py", "train.py", ".gitignore", "program.md")):
        self.path = path
        self.cache = cache or path.parent / "cache"
        path.mkdir(parents=True)
        for name in copy:
            shutil.copy(PROJECT / name, path)
        for folder in ("scripts", "skills"):
            shutil.copytree(PROJECT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__"))
        if cache is None:
            write_standin_manifest(self.cache)
        self.env = dict(os.environ, AUTORESEARCH_CACHE=str(self.cache),
                        AUTORESEARCH_TRAIN_COMMAND=f"{sys.executable} {BOWL}",
                        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
                        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
        for key in ("AUTORESEARCH_SEED", "AUTORESEARCH_PROFILE", "AUTORESEARCH_DATASET", "AUTORESEARCH_LOOP_KILL_AT"):
            self.env.pop(key, None)
        commit_new_repository(self.path, env=self.env)

    def loop(self, *args, env=None, timeout=120):
        return subprocess.run([sys.executable, "scripts/loop.py", *args], cwd=self.path,
                              env=dict(self.env, **(env or {})),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args, env=None, timeout=120):
        """`loop.py start` without the referee (the fake trainer saves no model for prepare.py to re-score)
        and, unless asked, without noise runs (the helpers' default noise band applies)."""
        noise = [] if "--noise-runs" in args else ["--noise-runs", "0"]
        return self.loop("start", "--no-referee", *noise, *args, env=env, timeout=timeout)

    def spawn(self, *args, env=None):
        """The loop as a process of its own session (so a test can kill its whole group)."""
        return subprocess.Popen([sys.executable, "scripts/loop.py", *args], cwd=self.path,
                                env=dict(self.env, **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def git(self, *args):
        return subprocess.run(["git", *args], cwd=self.path, env=getattr(self, "env", None), check=True,
                              capture_output=True, text=True).stdout.strip()

    def rows(self):
        lines = (self.path / "results.tsv").read_text().splitlines()
        assert lines[0] == HEADER
        return [line.split("\t") for line in lines[1:]]

    def state(self):
        return json.loads((self.path / "runs" / "loop" / "state.json").read_text())

    def record(self, number):
        return json.loads((self.path / "runs" / "loop" / f"{number:04d}" / "iteration.json").read_text())

    def report(self):
        return (self.path / "REPORT.md").read_text()

    def pending(self):
        path = self.path / "runs" / "pending.json"
        return json.loads(path.read_text()) if path.exists() else None

    def wait_for(self, condition, seconds=60, what="condition"):
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)


def description(row):
    """A ledger row's description without the helpers' note on how many runs its value averages."""
    return re.sub(r" \[mean of \d+ runs\]$", "", row[4])


def agent(name):
    return str(AGENTS / name)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def check_consistent(repo):
    """What must hold after any run, killed or not: every run recorded once, nothing pending,
    the working tree clean, and the branch at the best kept commit of the lineage."""
    rows = repo.rows()
    run_dirs = sorted(p.parent.name for p in (repo.path / "runs").glob("[0-9][0-9][0-9][0-9]-*/summary.json")
                      if json.loads(p.read_text()).get("kind", "experiment") == "experiment")
    assert len(run_dirs) == len(rows), (run_dirs, rows)
    assert [name.split("-")[1] for name in run_dirs] == [row[0] for row in rows]
    assert repo.pending() is None
    assert repo.git("status", "--porcelain", "--untracked-files=no") == ""
    kept = [row for row in rows if row[3] == "keep"]
    assert repo.git("rev-parse", "HEAD").startswith(kept[-1][0])
    values = [float(row[1]) for row in kept]
    assert values == sorted(values, reverse=True), "the kept frontier only improves"
    return rows
