"""The headless loop end to end on the real prepare.py and train.py: the cpu profile, the offline
corpus (prepared once by conftest's builtin_cache with a 5-second budget), the random proposer,
the referee on. About a minute on 2 cores."""

import json

from loop_repo import LoopRepo, check_consistent, description, ok


def test_the_random_loop_on_the_real_train_py(tmp_path, builtin_cache):
    repo = LoopRepo(tmp_path / "repo", cache=builtin_cache)
    repo.env.pop("AUTORESEARCH_TRAIN_COMMAND")
    output = ok(repo.loop("start", "--agent", "random", "--max-experiments", "1", "--noise-runs", "0", timeout=600))
    assert "finished: --max-experiments 1 reached" in output
    rows = check_consistent(repo)
    assert len(rows) == 2 and description(rows[0]) == "baseline" and rows[0][3] == "keep"
    assert 0 < float(rows[0][1]) < 20
    run = repo.record(0)["runs"][0]
    summary = json.loads((repo.path / run["run_dir"] / "summary.json").read_text())
    assert summary["referee"] == "verified" and summary["metrics"]["num_steps"] > 0
    experiment = repo.record(1)
    assert experiment["proposal"]["source"] == "random" and experiment["outcome"] in ("keep", "discard", "crash")
    assert "Stopped: --max-experiments 1 reached" in repo.report()
    assert (repo.path / "progress.png").exists()
