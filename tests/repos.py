"""Temporary research repositories, for the tests and the benchmarks alike: one recipe for the
first commit, one for a cache that says it is prepared. Standard library only, so a benchmark can
import it without pytest."""

import json
import subprocess
from pathlib import Path

# What `prepare.py --dataset builtin --profile cpu` records, for tests whose training is a stand-in
# and never reads the data.
STANDIN_MANIFEST = {"profile": "cpu", "dataset": "builtin", "max_seq_len": 256, "time_budget": 5,
                    "eval_tokens": 4096, "vocab_size": 512, "prepared_at": "2026-11-23T00:00:00+00:00"}


def commit_new_repository(path, message="start", env=None):
    """`path` becomes a git repository on main whose one commit holds everything in it."""
    for command in (["init", "-q", "-b", "main"], ["config", "user.name", "Test"],
                    ["config", "user.email", "test@example.com"], ["add", "-A"], ["commit", "-q", "-m", message]):
        subprocess.run(["git", *command], cwd=path, env=env, check=True, capture_output=True)


def write_standin_manifest(cache, **changes):
    """`cache`/prepared/prepared.json and nothing else: STANDIN_MANIFEST with `changes`."""
    prepared = Path(cache) / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "prepared.json").write_text(json.dumps(dict(STANDIN_MANIFEST, **changes)))
