"""Lanes on this machine (backend local), the one view across lanes, stop, and the SkyPilot and
Modal launch definitions checked offline (neither can run here without an account).

The local lanes run the fast fake tests/fixtures/cluster/lane_train.py, which records the
CUDA_VISIBLE_DEVICES it was given: no GPU is needed to check that each lane keeps to its own.
"""

import argparse
import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lanes_repo import FAKE_LOOP, FAKE_TRAIN, PROJECT, LanesRepo, pid_gone, wait_for


@pytest.fixture
def repo(tmp_path):
    return LanesRepo(tmp_path / "repo", fake_seconds=0.5)


def test_two_local_lanes_run_in_parallel_each_on_its_own_gpu(repo):
    out = repo.lanes("start", "2", "--backend", "local", "--tag", "loc", "--train-command", FAKE_TRAIN,
                     "--", *FAKE_LOOP, "--max-experiments", "2", "--timeout", "30")
    assert "2 loops started on GPUs 0,1" in out
    status = repo.wait_until_stopped(timeout=90)
    assert status["experiments"] == 6 and status["per_hour"] > 0
    for k, lane in enumerate(repo.lane_paths("loc")):
        assert repo.git("branch", "--show-current", cwd=lane) == f"autoresearch/loc-lane{k}"
        assert len(repo.rows(lane)) == 3
        runs = [run for run in repo.traces() if Path(run["cwd"]) == lane]
        assert len(runs) >= 3 and {run["gpu"] for run in runs} == {str(k)}
    best = status["best"]
    assert best["lane"] in ("lane0", "lane1")
    assert best["val_bpb"] == min(lane["best"]["val_bpb"] for lane in status["lanes"])
    text = repo.lanes("status")
    assert text.startswith("lanes loc (local, 0/2 running): 6 experiments") and f"in {best['lane']}" in text
    assert "wrote runs/lanes/loc-progress.png (2 lanes, 6 experiments)" in repo.lanes("plot")


def test_two_gpus_per_run_give_each_local_lane_a_pair_of_its_own(repo):
    out = repo.lanes("start", "2", "--backend", "local", "--tag", "pair", "--gpus-per-run", "2",
                     "--gpu-ids", "3,2,1,0", "--train-command", FAKE_TRAIN,
                     "--", *FAKE_LOOP, "--max-experiments", "0", "--timeout", "30")
    assert "2 loops started on GPUs 3,2 | 1,0" in out
    repo.wait_until_stopped(timeout=90)
    for lane, pair in zip(repo.lane_paths("pair"), ("3,2", "1,0")):
        runs = [run for run in repo.traces() if Path(run["cwd"]) == lane]
        assert runs and {run["gpu"] for run in runs} == {pair}


def test_stop_now_stops_every_loop_and_its_training(repo):
    repo.env["FAKE_SECONDS"] = "60"
    repo.lanes("start", "2", "--backend", "local", "--tag", "st", "--train-command", FAKE_TRAIN,
               "--", *FAKE_LOOP, "--max-experiments", "5", "--timeout", "120")
    lanes = repo.lane_paths("st")

    def training_groups():
        pending = [json.loads((lane / "runs" / "pending.json").read_text()) if (lane / "runs" / "pending.json").exists()
                   else {} for lane in lanes]
        return [record.get("training_pgid") for record in pending]

    assert wait_for(lambda: all(training_groups()), timeout=30)
    groups = training_groups()
    started = time.monotonic()
    out = repo.lanes("stop", "--now")
    assert "2 loops stopped" in out and time.monotonic() - started < 20
    status = repo.status()
    assert status["running"] == 0
    assert all(pid_gone(pgid) for pgid in groups)  # each group's leader: the training command
    assert all((lane / "STOP").exists() for lane in lanes)


def test_refusals_are_one_line_with_exit_2(repo):
    result = repo.run("lanes", "status")
    assert result.returncode == 2 and "no lanes here" in result.stderr
    result = repo.run("lanes", "start", "3", "--backend", "local", "--gpu-ids", "0,1")
    assert result.returncode == 2 and "every lane needs GPUs of its own" in result.stderr
    result = repo.run("lanes", "start", "2", "--backend", "local", "--gpus-per-run", "2", "--gpu-ids", "0,1,2")
    assert result.returncode == 2 and "3 GPUs for 2 lanes of 2 GPU(s) each" in result.stderr
    result = repo.run("lanes", "start", "2", "--backend", "slurm", "--gpus-per-run", "0")
    assert result.returncode == 2 and "--gpus-per-run must be at least 1" in result.stderr
    (repo.path / "train.py").write_text("changed\n")
    result = repo.run("lanes", "start", "2", "--backend", "slurm")
    assert result.returncode == 2 and "uncommitted changes" in result.stderr
    result = repo.run("dispatch", "--backend", "slurm", "python", "train.py")
    assert result.returncode == 2 and "after --" in result.stderr


def test_cluster_lanes_put_the_dispatcher_in_front_of_training():
    sys.path.insert(0, str(PROJECT / "scripts"))
    import lanes

    args = argparse.Namespace(
        backend="slurm", train_command=None, gpus_per_run=2, partition="gpu", sbatch_option=["--account=lab"],
        address=None, env=[])
    command = lanes.training_command(args)
    # Two GPUs per run: train.py under torchrun, as experiment.py --gpus 2 runs it.
    assert command.endswith(f"-- {sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 train.py")
    assert "scripts/dispatch.py --backend slurm --gpus 2 --partition=gpu --sbatch-option=--account=lab" in command
    args.gpus_per_run = 1
    assert lanes.training_command(args).endswith(f"-- {sys.executable} train.py")
    args.backend, args.address, args.env = "ray", "http://head:8265", ["WANDB_API_KEY"]
    command = lanes.training_command(args)
    assert "--gpus 1 --address=http://head:8265 --env=WANDB_API_KEY -- python train.py" in command
    args.gpus_per_run = 4
    assert lanes.training_command(args).endswith("-- python -m torch.distributed.run --standalone "
                                                 "--nproc_per_node=4 train.py")  # the cluster's Python
    args.backend = "local"
    assert lanes.training_command(args) is None  # the loop's default: train.py with the lane's GPUs


def test_the_dispatcher_prints_its_help_and_refuses_a_command_without_its_separator():
    dispatch = [sys.executable, str(PROJECT / "scripts" / "dispatch.py")]
    helped = subprocess.run([*dispatch, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--backend {slurm,ray}" in helped.stdout, helped.stderr
    refused = subprocess.run([*dispatch, "--backend", "slurm", "python", "train.py"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "after --" in refused.stderr


def test_skypilot_task_asks_for_one_gpu_ships_the_repository_and_runs_the_loop():
    import yaml  # installed with Ray (the cluster group)

    task = yaml.safe_load((PROJECT / "scripts" / "cluster" / "skypilot_lane.yaml").read_text())
    assert task["resources"]["accelerators"] == "H100:1"
    assert task["workdir"] == "."
    assert "uv sync --locked" in task["setup"] and "prepare.py" in task["setup"]
    assert "uv run scripts/loop.py start --tag $LANE_TAG $LOOP_OPTIONS" in task["run"]
    assert set(task["envs"]) == {"LANE_TAG", "LOOP_OPTIONS", "DATASET"}


def test_modal_app_requests_the_gpu_ships_train_py_and_runs_it():
    source = (PROJECT / "scripts" / "cluster" / "modal_app.py").read_text()
    tree = ast.parse(source)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    decorator = next(d for d in functions["train"].decorator_list if isinstance(d, ast.Call))
    keywords = {keyword.arg: keyword.value for keyword in decorator.keywords}
    assert ast.unparse(keywords["gpu"]) == "GPU"
    assert 'os.environ.get("AUTORESEARCH_MODAL_GPU", "H100:1")' in source
    assert "CACHE: volume" in ast.unparse(keywords["volumes"])
    body = ast.unparse(functions["train"])
    assert "write_text(train_py)" in body
    # H100:8 is eight DDP ranks under torchrun, one GPU each; H100 or H100:1 is train.py alone.
    count = next(ast.unparse(node) for node in tree.body if ast.unparse(node).startswith("GPU_COUNT ="))
    for spec, expected in (("H100:8", 8), ("A100-80GB:2", 2), ("H100", 1), ("H100:1", 1)):
        namespace = {"GPU": spec}
        exec(count, namespace)
        assert namespace["GPU_COUNT"] == expected
    assert "'--standalone', f'--nproc_per_node={GPU_COUNT}'" in body
    assert "['uv', 'run', *(ranks if GPU_COUNT > 1 else []), 'train.py']" in body
    entry = ast.unparse(functions["main"])
    assert "train.remote(Path('train.py').read_text()" in entry and "sys.exit(code)" in entry
    for shipped in ("pyproject.toml", "uv.lock", "prepare.py"):
        assert f'PROJECT / "{shipped}"' in source


def test_a_cancel_whose_exception_a_finalizer_swallowed_still_stops_the_follow(monkeypatch, tmp_path):
    """A SIGTERM that lands while a garbage-collected HTTP connection closes raises inside a
    finalizer, where Python prints the exception and drops it: the dispatcher then followed the job
    to its end as if nothing had happened, or, killed at last, left it running on the cluster. The
    follow loop checks again at every turn."""
    import gc
    import signal
    import weakref

    sys.path.insert(0, str(PROJECT / "scripts"))
    import dispatch

    class Long:  # a job that runs for three polls, then ends well
        polls = 0

        def running(self, record, root):
            self.polls += 1
            return self.polls <= 3

        def exit_code(self, record, root):
            return 0, None

        def started(self, record, root):
            return True

        def read_log(self, record, root, offset):
            return b""

    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        class Connection:
            pass
        connection = Connection()
        weakref.finalize(connection, dispatch.raise_cancelled, signal.SIGTERM, None)
        dropped = []  # what Python does with an exception a finalizer raises: report it, go on
        monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
        del connection
        gc.collect()
        assert dropped == [dispatch.Cancelled]
        with pytest.raises(dispatch.Cancelled):
            dispatch.follow(Long(), {"key": "k", "state": "submitted"}, tmp_path)
    finally:
        dispatch.CANCEL_SIGNAL.clear()
        for number, handler in handlers.items():
            signal.signal(number, handler)


# Runs lanes.py plot with Axes.scatter recording the points it draws (the figure is still written).
RECORDING_PLOT = """
import json, runpy, sys
import matplotlib.axes
drawn, scatter = [], matplotlib.axes.Axes.scatter
def recording(self, x, y, *args, **kwargs):
    drawn.extend(float(value) for value in y)
    return scatter(self, x, y, *args, **kwargs)
matplotlib.axes.Axes.scatter = recording
sys.argv = ["scripts/lanes.py", "plot", "--tag", sys.argv[1]]
try:
    runpy.run_path("scripts/lanes.py", run_name="__main__")
finally:
    print(json.dumps(drawn))
"""


def test_the_lanes_plot_draws_no_crash_or_invalid_run_at_zero(repo):
    repo.lanes("start", "2", "--backend", "local", "--tag", "pz", "--train-command", FAKE_TRAIN,
               "--", *FAKE_LOOP, "--max-experiments", "0", "--timeout", "30")
    repo.wait_until_stopped(timeout=90)
    lane = repo.lane_paths("pz")[0]
    commit = repo.rows(lane)[0][0]
    with (lane / "results.tsv").open("a") as ledger:  # what experiment.py records for runs without a result
        ledger.write(f"{commit}\t0.000000\t0.0\tinvalid\tlooked ahead\n{commit}\t0.000000\t0.0\tcrash\toom\n")
    result = subprocess.run([sys.executable, "-c", RECORDING_PLOT, "pz"], cwd=repo.path, env=repo.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrote runs/lanes/pz-progress.png (2 lanes, 4 experiments)" in result.stdout
    drawn = json.loads(result.stdout.strip().splitlines()[-1])
    baselines = [float(repo.rows(path)[0][1]) for path in repo.lane_paths("pz")]
    assert 0.0 not in drawn and sorted(baselines) == sorted(drawn[:2]), drawn
