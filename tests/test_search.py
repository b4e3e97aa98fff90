"""The Optuna proposer (loop.py --agent optuna, scripts/search.py) through the real headless loop.

Training is the bowl (tests/fixtures/fake_train_loop/bowl.py): val_bpb is a known function of
train.py's settings, so each trial's told value can be checked against the ledger. The study is
read back with Optuna itself from the SQLite file the loop wrote.
"""

import json
import os
import shlex
import shutil
import signal
import statistics
import sys
from pathlib import Path

import pytest
from lanes_repo import LanesRepo
from loop_repo import BOWL, LoopRepo, check_consistent, ok

optuna = pytest.importorskip("optuna", reason="the search group: uv sync --group search")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import search  # noqa: E402


@pytest.fixture
def repo(tmp_path):
    return LoopRepo(tmp_path / "repo")


def trials(path, name):
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def asked(study_trials):
    """The trials the loop proposed (not the baseline, not those pruned as configurations train.py refuses)."""
    return [t for t in study_trials if not t.user_attrs.get("baseline") and t.state != optuna.trial.TrialState.PRUNED]


def test_tpe_proposes_every_experiment_and_learns_each_result_from_the_ledger(repo):
    ok(repo.start("--agent", "optuna", "--max-experiments", "4", "--tag", "tpe"))
    rows = check_consistent(repo)
    assert len(rows) == 5
    study = trials(repo.path / "runs" / "loop" / "optuna.db", "tpe")
    baseline = [t for t in study if t.user_attrs.get("baseline")]
    assert len(baseline) == 1 and baseline[0].value == float(rows[0][1])
    proposed = asked(study)
    assert [t.user_attrs["iteration"] for t in proposed] == [1, 2, 3, 4]
    for trial, row, number in zip(proposed, rows[1:], range(1, 5)):
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.value == float(row[1])  # the judged value: the mean of both runs after a confirmation
        assert row[4].startswith(f"tpe trial {trial.number}:")
        record = repo.record(number)
        assert record["proposal"]["source"] == "optuna" and record["proposal"]["trial"] == trial.number
        trained = repo.git("show", f"{record['runs'][-1]['commit']}:train.py")
        active = {name: value for name, (_, value) in search.active_settings(trained, "cpu").items()}
        assert {name: active[name] for name in values_of(trial)} == values_of(trial)


def values_of(trial):
    """train.py's values as the trial drew them (powers of two by their exponent, floats to 3 digits)."""
    values = {}
    for name, value in trial.params.items():
        if name.startswith("log2("):
            values[name[5:-1]] = 2 ** value
        else:
            values[name] = float(f"{value:.3g}") if isinstance(value, float) else value
    return values


def test_a_trial_asked_again_for_the_same_iteration_is_the_same_trial(repo):
    """What a loop killed between asking and saving its state finds on resume: its own trial."""
    storage = optuna.storages.InMemoryStorage()
    text = (repo.path / "train.py").read_text()
    study, space = search.load_study(storage, "s", "tpe", 0, text, "cpu")
    first, values = search.ask(study, space, "lane0", 1, 256)
    again, values_again = search.ask(study, space, "lane0", 1, 256)
    other, _ = search.ask(study, space, "lane1", 1, 256)
    assert again.number == first.number and values_again == values
    assert other.number != first.number


def test_cma_es_on_request(repo):
    ok(repo.start("--agent", "optuna", "--sampler", "cmaes", "--max-experiments", "3", "--tag", "cma"))
    rows = check_consistent(repo)
    assert [row[4].split(":")[0].rsplit(" ", 1)[0] for row in rows[1:]] == ["cmaes trial"] * 3
    proposed = asked(trials(repo.path / "runs" / "loop" / "optuna.db", "cma"))
    assert len(proposed) == 3
    assert all(any(key.endswith(":generation") for key in t.system_attrs) for t in proposed), "not sampled by CMA-ES"


def test_a_crash_is_a_failed_trial(repo, tmp_path):
    """A trainer that crashes on anything but the baseline's train.py: every trial fails."""
    crasher = tmp_path / "crash_unless_baseline.py"  # its folder is all the sandbox shows of it: the bowl goes there too
    shutil.copy(BOWL, tmp_path / "bowl.py")
    crasher.write_text(
        "import hashlib, runpy, sys\n"
        f"if hashlib.sha256(open('train.py', 'rb').read()).hexdigest() != {repr(sha(repo.path / 'train.py'))}:\n"
        "    raise SystemExit('RuntimeError: boom')\n"
        f"runpy.run_path({str(tmp_path / 'bowl.py')!r}, run_name='__main__')\n")
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(crasher))}"
    ok(repo.start("--agent", "optuna", "--max-experiments", "5", "--max-failures", "2", "--tag", "crash",
                  "--train-command", command))
    rows = repo.rows()
    assert [row[3] for row in rows] == ["keep", "crash", "crash"]
    proposed = asked(trials(repo.path / "runs" / "loop" / "optuna.db", "crash"))
    assert [t.state for t in proposed] == [optuna.trial.TrialState.FAIL] * 2


def sha(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


STAGES = ["propose", "apply", "validate", "commit", "train", "triage", "record", "decide", "remember", "stop-check"]


def test_kill_9_at_every_stage_resumes_the_same_study_and_asks_nothing_twice(repo):
    command = ["start", "--no-referee", "--noise-runs", "0", "--agent", "optuna", "--max-experiments", "2",
               "--tag", "killed"]
    for stage in ["remember"] + STAGES:
        iteration = 0 if stage == "remember" and command[0] == "start" else 1
        result = repo.loop(*command, env={"AUTORESEARCH_LOOP_KILL_AT": f"{stage}:{iteration}"})
        assert result.returncode == -signal.SIGKILL, (stage, result.stdout, result.stderr)
        command = ["resume"]
    ok(repo.loop("resume"))
    rows = check_consistent(repo)
    assert len(rows) == 3
    study = trials(repo.path / "runs" / "loop" / "optuna.db", "killed")
    proposed = asked(study)
    assert [t.user_attrs["iteration"] for t in proposed] == [1, 2], [(t.number, t.user_attrs) for t in study]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in proposed)
    assert [t.value for t in proposed] == [float(row[1]) for row in rows[1:]]
    assert len([t for t in study if t.user_attrs.get("baseline")]) == 1


def test_lanes_share_one_study_and_each_lane_asks_its_own_trials(tmp_path):
    lanes = LanesRepo(tmp_path / "repo")
    train = f"{shlex.quote(sys.executable)} {shlex.quote(str(BOWL))}"
    lanes.lanes("start", "2", "--backend", "local", "--tag", "shared", "--train-command", train,
                "--", "--no-referee", "--noise-runs", "0", "--agent", "optuna", "--max-experiments", "3")
    status = lanes.wait_until_stopped(timeout=360)
    assert status["experiments"] == 8, json.dumps(status)
    study = trials(lanes.path / "runs" / "lanes" / "shared" / "optuna.db", "shared")
    proposed = asked(study)
    owners = sorted({t.user_attrs["owner"] for t in proposed})
    assert owners == ["shared-lane0", "shared-lane1"]
    for owner in owners:
        assert sorted(t.user_attrs["iteration"] for t in proposed if t.user_attrs["owner"] == owner) == [1, 2, 3]
    assert len({t.number for t in proposed}) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in proposed)
    for lane in lanes.lane_paths("shared"):
        assert not (lane / "runs" / "loop" / "optuna.db").exists()


def test_optuna_refuses_queued_instructions_like_the_random_proposer(repo):
    (repo.path / "next_proposal.json").write_text(json.dumps({"description": "x", "instructions": "do it"}))
    ok(repo.start("--agent", "optuna", "--max-experiments", "1", "--max-failures", "1", "--tag", "queue"))
    assert "queued instructions need an agent" in repo.record(1)["reason"]
    assert os.path.exists(repo.path / "runs" / "loop" / "optuna.db")


def test_a_confirmed_marginal_result_is_told_as_the_mean_of_its_runs(repo):
    """On a flat bowl every gain is within the noise: marginal, re-run under a new seed, judged on the mean."""
    ok(repo.start("--agent", "optuna", "--max-experiments", "4", "--tag", "flat", env={"FAKE_FLAT": "1"}))
    rows = check_consistent(repo)
    confirmed = [row for row in rows[1:] if row[4].endswith("[mean of 2 runs]")]
    assert confirmed, rows
    proposed = {t.number: t for t in asked(trials(repo.path / "runs" / "loop" / "optuna.db", "flat"))}
    for row in confirmed:
        trial = proposed[int(row[4].split(":")[0].rsplit(" ", 1)[1])]
        summary = next(s for s in (json.loads(p.read_text()) for p in (repo.path / "runs").glob(f"*-{row[0]}/summary.json"))
                       if s.get("kind") == "experiment")
        means = statistics.fmean(sample["val_bpb"] for sample in summary["samples"])
        assert len(summary["samples"]) == 2 and trial.value == pytest.approx(means, abs=1e-9)
        assert float(row[1]) == pytest.approx(means, abs=1e-6)  # the ledger keeps six decimals
