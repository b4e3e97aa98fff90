"""Parameter golf on the built-in protocol (setup.py --golf), end to end on the CPU and offline:
the real helpers train this train.py, the referee scores the saved model after the int8+zlib round
trip and measures the artifact, and decide.py refuses to keep one over the 16,000,000-byte limit."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE_TRAIN_TOKENS, copy_project, run_prepare


@pytest.fixture(scope="module")
def golf_cache(tmp_path_factory):
    """The offline corpus on the golf-cpu profile (the challenge's 1024-token vocabulary), with the
    short budget and evaluation of conftest's builtin_cache."""
    cache = tmp_path_factory.mktemp("golf-cache")
    result = run_prepare(cache, "--dataset", "builtin", "--profile", "golf-cpu", "--time-budget", "5",
                         "--train-tokens", str(SMOKE_TRAIN_TOKENS), "--eval-tokens", str(16 * 256))
    assert result.returncode == 0, result.stderr
    return cache


def test_golf_scores_the_round_trip_and_never_keeps_an_artifact_over_the_limit(tmp_path, golf_cache):
    repo = copy_project(tmp_path)
    env = dict(os.environ, AUTORESEARCH_CACHE=str(golf_cache))
    for key in ("AUTORESEARCH_TRAIN_COMMAND", "AUTORESEARCH_SEED", "AUTORESEARCH_PROFILE"):
        env.pop(key, None)

    def helper(*args):
        return subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=500)

    refused = helper("scripts/setup.py", "--tag", "g0", "--golf", "--no-referee")
    assert refused.returncode == 2 and "--no-referee" in refused.stderr and len(refused.stderr.splitlines()) == 1
    setup = helper("scripts/setup.py", "--tag", "golf", "--golf", "--noise-runs", "0")
    assert setup.returncode == 0 and "parameter golf" in setup.stdout, setup.stdout + setup.stderr

    (repo / "notes.md").write_text((repo / "notes.md").read_text() + "\n### REASONING: baseline\n"
                                   "- hypothesis: the unchanged train.py fits in the limit\n")
    baseline = helper("scripts/experiment.py", "baseline", "--timeout", "400")
    assert baseline.returncode == 0 and baseline.stdout.startswith("0001 "), baseline.stdout + baseline.stderr
    (run_dir,) = (repo / "runs").glob("0001-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    referee = (run_dir / "referee-val.log").read_text()
    model_bytes = int(re.search(r"^Serialized model int8\+zlib: (\d+) bytes$", referee, re.M).group(1))
    round_trip = float(re.search(r"^final_int8_zlib_roundtrip val_bpb:(\S+)$", referee, re.M).group(1))
    # the artifact is exactly the committed train.py plus the compressed model
    assert summary["artifact_bytes"] == len((repo / "train.py").read_bytes()) + model_bytes
    assert f"Total submission size int8+zlib: {summary['artifact_bytes']} bytes" in referee
    assert summary["artifact_limit_bytes"] == 16_000_000 and summary["verdict"] == "baseline"
    # the number that decides is the round-tripped model's, scored by the referee
    assert summary["referee"] == "verified" and summary["val_bpb"] == pytest.approx(round_trip, abs=1e-6)
    # the golf-cpu profile: the challenge's vocabulary, trained on the CPU clock by one process
    assert summary["profile"] == "golf-cpu" and summary["manifest"]["vocab_size"] == 1024
    assert summary["clock"] == "cpu_time" and "world_size" not in summary["metrics"]
    assert f"artifact {summary['artifact_bytes'] / 1e6:.3f} MB" in baseline.stdout
    kept = helper("scripts/decide.py", "keep")
    assert kept.returncode == 0, kept.stdout + kept.stderr

    # A real change, plus a constant that makes the file alone larger than the limit.
    text = (repo / "train.py").read_text()
    grown = text.replace("WARMDOWN_RATIO = 0.5 ", "WARMDOWN_RATIO = 0.45", 1)
    assert grown != text
    (repo / "train.py").write_text(grown + '\nGOLF_PADDING = "' + "x" * 16_000_000 + '"\n')
    big = helper("scripts/experiment.py", "warmdown 0.45, padded", "--timeout", "400")
    assert big.returncode == 0 and big.stdout.startswith("0002 "), big.stdout + big.stderr
    assert ": too big" in big.stdout and "next: decide.py discard" in big.stdout, big.stdout
    (run_dir,) = (repo / "runs").glob("0002-*")
    assert json.loads((run_dir / "summary.json").read_text())["artifact_bytes"] > 16_000_000
    for force in ([], ["--force"]):
        refused = helper("scripts/decide.py", "keep", *force)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "over parameter golf's 16,000,000" in refused.stderr
    discarded = helper("scripts/decide.py", "discard")
    assert discarded.returncode == 0, discarded.stdout + discarded.stderr
    header, *lines = (repo / "results.tsv").read_text().splitlines()
    assert header.split("\t") == ["commit", "val_bpb", "artifact_mb", "status", "reasoning", "description"]
    rows = [line.split("\t") for line in lines]
    assert [row[3] for row in rows] == ["keep", "discard"] and [len(row) for row in rows] == [6, 6]
    assert float(rows[0][1]) == pytest.approx(summary["val_bpb"], abs=1e-6)
    assert float(rows[0][2]) == summary["artifact_bytes"] / 1e6 and float(rows[1][2]) > 16.0
    assert rows[0][4] == rows[1][4] == "the unchanged train.py fits in the limit"  # the newest REASONING
    status = helper("scripts/status.py")
    assert status.returncode == 0 and lines[0] in status.stdout and lines[1] in status.stdout, status.stdout


def test_the_helpers_and_the_referee_agree_on_the_limit():
    sys.path.insert(0, str(ROOT / "scripts"))
    import runner
    source = (ROOT / "prepare.py").read_text()
    assert re.search(r"^GOLF_LIMIT_BYTES = 16_000_000\b", source, re.M)
    assert runner.GOLF_LIMIT_BYTES == 16_000_000


def test_the_golf_profiles_are_the_challenges_and_golf_trains_on_its_eight_gpus_by_default(monkeypatch):
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    import argparse
    import experiment
    import prepare
    golf, cpu = prepare.PROFILES["golf"], prepare.PROFILES["golf-cpu"]
    assert (golf["vocab_size"], golf["max_seq_len"], golf["time_budget"], golf["gpus"]) == (1024, 1024, 600, 8)
    assert cpu["vocab_size"] == 1024 and "gpus" not in cpu and "golf-cpu" in prepare.CPU_PROFILES

    def gpus(option=None, command=None, manifest=None, external=None, session=None):
        return experiment.gpus_of(argparse.Namespace(gpus=option, train_command=command), session, manifest, external)

    monkeypatch.delenv("AUTORESEARCH_TRAIN_COMMAND", raising=False)
    assert gpus(manifest={"profile": "golf", "gpus": 8}) == 8  # torchrun, one rank per GPU
    assert gpus(option=1, manifest={"profile": "golf", "gpus": 8}) == 1  # a smaller machine says so
    assert gpus(session={"gpus": 2}, manifest={"profile": "golf", "gpus": 8}) == 2  # or says so once, at setup
    assert gpus(option=1, session={"gpus": 2}, manifest={"gpus": 8}) == 1
    assert gpus(manifest={"profile": "h100"}) == gpus(manifest=None) == 1
    assert gpus(command="python my_train.py", manifest={"gpus": 8}) == 1  # a custom command runs its own
    assert gpus(manifest={"gpus": 8}, external=object()) == 1  # so does an external task's
