"""The headless loop end to end on the real prepare.py and train.py: the cpu profile, the offline
corpus (prepared once by conftest's builtin_cache with a 5-second budget), the random proposer,
the referee and the sandbox on; then what the helpers recorded for the baseline, and status and
plot on that ledger: the one real-train session for both the loop and the helpers. About a
minute on 2 cores."""

import json
import subprocess
import sys

from loop_repo import LoopRepo, check_consistent, description, ok


def session_sandbox(repo):
    session = json.loads((repo / "runs" / "session.json").read_text())
    return "on" if session["sandbox"] == "on" else session["sandbox"] + (
        f": {session['sandbox_problem']}" if session["sandbox"] == "unavailable" else "")


def helper(repo, *args):
    result = subprocess.run([sys.executable, *args], cwd=repo.path, env=repo.env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_random_loop_on_the_real_train_py(tmp_path, builtin_cache):
    repo = LoopRepo(tmp_path / "repo", cache=builtin_cache)
    repo.env.pop("AUTORESEARCH_TRAIN_COMMAND")  # experiment.py's default: this Python running train.py
    output = ok(repo.loop("start", "--agent", "random", "--max-experiments", "1", "--noise-runs", "0", timeout=600))
    assert "finished: --max-experiments 1 reached" in output
    rows = check_consistent(repo)
    assert len(rows) == 2 and description(rows[0]) == "baseline" and rows[0][3] == "keep"
    assert 0 < float(rows[0][1]) < 20
    experiment = repo.record(1)
    assert experiment["proposal"]["source"] == "random" and experiment["outcome"] in ("keep", "discard", "crash")
    assert "Stopped: --max-experiments 1 reached" in repo.report()
    assert (repo.path / "progress.png").exists()

    # The baseline as experiment.py printed and recorded it
    line = (repo.path / "runs" / "loop" / "0000" / "experiment-1.out").read_text()
    assert line.startswith("0001 ") and "baseline" in line and len(line.splitlines()) == 1, line
    run_dir = repo.path / repo.record(0)["runs"][0]["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and 0 < summary["val_bpb"] < 20
    assert summary["metrics"]["num_steps"] > 0 and summary["profile"] == "cpu"
    assert summary["decision"]["status"] == "keep"
    # The referee scored the model train.py saved, in a process of its own; its number is the result.
    (sample,) = summary["samples"]
    assert summary["referee"] == "verified" and sample["referee"]["bpb"] == sample["val_bpb"] == summary["val_bpb"]
    assert (run_dir / "out" / "model.pt2").exists() and summary["sandbox"] == session_sandbox(repo.path)
    val_lines = [line for line in (run_dir / "run.log").read_text().splitlines() if line.startswith("val_bpb:")]
    assert val_lines[-1] == f"val_bpb:          {summary['val_bpb']:.6f}"  # the referee's, appended by the helper
    if summary["sandbox"] == "on":  # the evaluation data was hidden: train.py had no number of its own
        assert sample["claimed"] is None and len(val_lines) == 1
        assert summary["verified"] is True and summary["protections"]["eval_hidden"] is True
        assert 0 < summary["compute_seconds"] <= summary["compute_limit_s"] and summary["clock"] == "cpu_time"
    # A new best: its model was scored on the held-out test split too, out of the agent's sight.
    heldout = json.loads((repo.path / "runs" / "heldout.json").read_text())
    assert heldout[0]["id"] == "0001" and 0 < heldout[0]["test_bpb"] < 20 and heldout[0]["error"] is None
    status = json.loads(helper(repo, "scripts/status.py", "--json"))
    kept = [float(row[1]) for row in rows if row[3] == "keep"]
    assert status["best"]["val_bpb"] == round(min(kept), 6)
    (repo.path / "progress.png").unlink()
    helper(repo, "scripts/plot.py")
    assert (repo.path / "progress.png").exists()
