"""The helpers end to end with the real prepare.py and train.py on the CPU profile (about 30 s).

The built-in corpus is prepared once for the whole test run by conftest's builtin_cache (a 5-second
time budget and a small evaluation keep it short); everything else is the real thing: the real
tokenizer and model, and experiment.py's default training command.
"""

import json
import os
import subprocess
import sys

from conftest import copy_project



def run(args, cwd, env):
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def session_sandbox(repo):
    session = json.loads((repo / "runs" / "session.json").read_text())
    return "on" if session["sandbox"] == "on" else session["sandbox"] + (
        f": {session['sandbox_problem']}" if session["sandbox"] == "unavailable" else "")


def test_setup_experiment_decide_status_plot_with_the_real_train_py(tmp_path, builtin_cache):
    repo = copy_project(tmp_path)
    env = dict(os.environ, AUTORESEARCH_CACHE=str(builtin_cache))
    for key in ("AUTORESEARCH_TRAIN_COMMAND", "AUTORESEARCH_SEED", "AUTORESEARCH_PROFILE"):
        env.pop(key, None)

    run(["scripts/setup.py", "--tag", "real", "--noise-runs", "0"], repo, env)
    line = run(["scripts/experiment.py", "baseline"], repo, env)
    assert line.startswith("0001 ") and "baseline" in line and len(line.splitlines()) == 1
    run(["scripts/decide.py", "keep"], repo, env)

    (run_dir,) = (repo / "runs").glob("0001-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and 0 < summary["val_bpb"] < 20
    assert summary["metrics"]["num_steps"] > 0 and summary["profile"] == "cpu"
    assert summary["decision"]["status"] == "keep"
    # The referee scored the model train.py saved, in a process of its own; its number is the result.
    (sample,) = summary["samples"]
    assert summary["referee"] == "verified" and sample["referee"]["bpb"] == sample["val_bpb"] == summary["val_bpb"]
    assert (run_dir / "out" / "model.pt2").exists() and summary["sandbox"] == session_sandbox(repo)
    val_lines = [line for line in (run_dir / "run.log").read_text().splitlines() if line.startswith("val_bpb:")]
    assert val_lines[-1] == f"val_bpb:          {summary['val_bpb']:.6f}"  # the referee's, appended by the helper
    if summary["sandbox"] == "on":  # the evaluation data was hidden: train.py had no number of its own
        assert sample["claimed"] is None and len(val_lines) == 1
        assert summary["verified"] is True and summary["protections"]["eval_hidden"] is True
        assert 0 < summary["compute_seconds"] <= summary["compute_limit_s"] and summary["clock"] == "cpu_time"
    # A new best: its model was scored on the held-out test split too, out of the agent's sight.
    (heldout,) = json.loads((repo / "runs" / "heldout.json").read_text())
    assert heldout["id"] == "0001" and 0 < heldout["test_bpb"] < 20 and heldout["error"] is None
    status = json.loads(run(["scripts/status.py", "--json"], repo, env))
    assert status["best"]["val_bpb"] == round(summary["val_bpb"], 6)
    run(["scripts/plot.py"], repo, env)
    assert (repo / "progress.png").exists()
