"""A real git repository in a temporary folder for the scale-out tests (tests/test_lanes*.py).

It holds copies of the project's prepare.py, train.py, scripts/ and skills/, a prepared-data
manifest in its own AUTORESEARCH_CACHE (no data: training is tests/fixtures/cluster/lane_train.py,
which reports the node and GPU it got and appends each run to a trace file), and runs
scripts/lanes.py and the loops with this Python. Also: whether the local SLURM and Ray clusters
of scripts/cluster/ are up, and the rule that CI (AUTORESEARCH_REQUIRE_CLUSTER=1) fails instead
of skipping when they are not.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import pid_gone  # noqa: F401  (the lane tests import it from here)
from repos import commit_new_repository, write_standin_manifest

PROJECT = Path(__file__).resolve().parent.parent
LANE_TRAIN = PROJECT / "tests" / "fixtures" / "cluster" / "lane_train.py"
FAKE_TRAIN = f"{shlex.quote(sys.executable)} {shlex.quote(str(LANE_TRAIN))}"
# The fake saves no model for the referee and needs no noise measurement (its result is a function
# of train.py): loop options for every lane of these tests.
FAKE_LOOP = ["--no-referee", "--noise-runs", "0"]
RAY_ADDRESS = os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


def require_cluster(name, available, how):
    """Skip when the cluster is not up, except in CI, where that is a failure."""
    if available:
        return
    message = f"no {name} cluster: {how}"
    if os.environ.get("AUTORESEARCH_REQUIRE_CLUSTER") == "1":
        pytest.fail(message + " (AUTORESEARCH_REQUIRE_CLUSTER=1)")
    pytest.skip(message)


def slurm_up():
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%D %G"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "gpu" in result.stdout


def ray_up():
    try:
        with urllib.request.urlopen(f"{RAY_ADDRESS}/api/version", timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


class LanesRepo:
    def __init__(self, path, fake_seconds=1.0):
        self.path = path
        self.cache = path.parent / "cache"
        self.trace = path.parent / "trace" / "trace.jsonl"  # its own folder, shared with the sandbox
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(parents=True)
        for name in ("prepare.py", "train.py", ".gitignore"):
            shutil.copy(PROJECT / name, path)
        for folder in ("scripts", "skills"):
            shutil.copytree(PROJECT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__"))
        write_standin_manifest(self.cache)
        self.env = dict(os.environ, AUTORESEARCH_CACHE=str(self.cache), FAKE_TRACE=str(self.trace),
                        AUTORESEARCH_SANDBOX_SHARE=str(self.trace.parent),
                        FAKE_SECONDS=str(fake_seconds), HOME=str(path.parent / "home"),
                        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
                        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
        (path.parent / "home").mkdir()
        for key in ("AUTORESEARCH_SEED", "AUTORESEARCH_PROFILE", "AUTORESEARCH_TRAIN_COMMAND", "FAKE_HANG"):
            self.env.pop(key, None)
        commit_new_repository(path, env=self.env)

    def git(self, *args, cwd=None):
        return subprocess.run(["git", *args], cwd=cwd or self.path, env=self.env, check=True, capture_output=True,
                              text=True).stdout.strip()

    def run(self, script, *args, cwd=None, env=None, timeout=120):
        return subprocess.run([sys.executable, f"scripts/{script}.py", *args], cwd=cwd or self.path,
                              env=dict(self.env, **(env or {})), capture_output=True, text=True, timeout=timeout)

    def lanes(self, *args, env=None, timeout=120):
        result = self.run("lanes", *args, env=env, timeout=timeout)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def status(self):
        return json.loads(self.lanes("status", "--json"))

    def wait_until_stopped(self, timeout):
        """Poll lanes.py status until no loop runs; returns the last status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status["running"] == 0:
                return status
            time.sleep(1)
        logs = [(Path(lane["path"]) / "runs" / "loop" / "loop.log").read_text()[-2000:] for lane in status["lanes"]]
        raise AssertionError(f"lanes still running after {timeout} s: {json.dumps(status)[:2000]}\n" + "\n".join(logs))

    def lane_paths(self, tag):
        return sorted((self.path / "runs" / "lanes" / tag).glob("lane*"))

    def traces(self):
        if not self.trace.exists():
            return []
        return [json.loads(line) for line in self.trace.read_text().splitlines() if line.strip()]

    def rows(self, lane):
        lines = (Path(lane) / "results.tsv").read_text().splitlines()
        return [line.split("\t") for line in lines[1:]]

    def job_records(self, lane):
        return [json.loads(path.read_text()) for path in sorted((Path(lane) / "runs" / "jobs").glob("*.json"))]

    def assert_one_job_per_run(self, lane):
        """Every training run of the lane (experiment, or a confirmation under a new seed) was
        submitted once: no (commit, seed) twice, and no experiment without its job."""
        records = self.job_records(lane)
        assert len({(record["commit"], record["seed"]) for record in records}) == len(records), records
        assert len(records) >= len(self.rows(lane))
        return records


def overlapping(runs):
    """Pairs of finished runs whose [start, end] intervals overlap."""
    runs = sorted(runs, key=lambda run: run["start"])
    return [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:] if b["start"] < a["end"]]


def wait_for(predicate, timeout, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
