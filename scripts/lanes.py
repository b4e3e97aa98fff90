"""Parallel research lanes: N headless loops, each in its own git worktree and branch, one view across them.

Lane k of a set TAG is the worktree runs/lanes/TAG/lane<k> on branch autoresearch/TAG-lane<k>,
running `scripts/loop.py start` in the background with its own ledger, runs/ and state; lanes
share only the read-only prepared data, so they never touch each other's files. Each lane's
training runs
    local  on this machine, pinned to one GPU (loop.py --gpu, i.e. CUDA_VISIBLE_DEVICES=k);
    slurm  as a SLURM job per experiment (scripts/dispatch.py; shared filesystem, sbatch on PATH);
    ray    as a Ray job per experiment (scripts/dispatch.py; --address or $RAY_ADDRESS).
The agent (or the random proposer) runs where the loop runs; only training goes to the cluster.
Cluster lanes start their loops with --no-sandbox: the sandbox (no network, a read-only worktree)
would keep the dispatcher from reaching the engine; the job runs on a node instead, under the
engine's own isolation.
The set is recorded in runs/lanes/TAG.json; commands without --tag act on the newest set.
With an autoresearch.toml (an external task, scripts/task.py) each lane runs the task's command and
needs no prepared data; the set records the task's metric, so status and plot rank the lanes by it,
in its direction, and say that it is self-reported.

Usage:
    uv run scripts/lanes.py start N --backend local|slurm|ray [--tag TAG] [options] [-- loop.py start options]
    uv run scripts/lanes.py status [--tag TAG] [--json]
    uv run scripts/lanes.py plot [--tag TAG] [--output PATH]
    uv run scripts/lanes.py stop [--tag TAG] [--now]
    uv run scripts/lanes.py resume [--tag TAG]
"""

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import runner  # noqa: E402
import dispatch  # noqa: E402
import task  # noqa: E402

LANES_DIR = common.RUNS_DIR / "lanes"  # TAG.json (the set) and TAG/lane<k>/ (the worktrees)
BACKENDS = ("local", "slurm", "ray")
STOP_WAIT_SECONDS = 30  # for the loops to exit after stop --now (experiment.py needs up to 5 s per run)
START_WAIT_SECONDS = 30  # for a detached loop to take its lock, so that status right after start sees it


# ---------------------------------------------------------------------------
# The set of lanes: runs/lanes/TAG.json


def set_file(tag):
    return LANES_DIR / f"{tag}.json"


def load_set(tag=None):
    """The lane set named `tag`, else the newest one; a Refusal when there is none."""
    if tag:
        lanes = common.read_json(set_file(tag))
        if lanes is None:
            raise common.Refusal(f"no lane set {tag} (no {set_file(tag).relative_to(common.ROOT)})")
        return lanes
    sets = [common.read_json(path) for path in LANES_DIR.glob("*.json")]
    if not sets:
        raise common.Refusal("no lanes here: uv run scripts/lanes.py start N --backend local|slurm|ray")
    return max(sets, key=lambda lanes: lanes["created_at"])


def lane_path(lane):
    return Path(lane["path"])


def set_task(lanes):
    """The external task the set was started on (recorded at start), or None for the built-in protocol."""
    return lanes.get("task")


def metric_direction(lanes):
    return set_task(lanes)["direction"] if set_task(lanes) else "lower"


def loop(lane, *args):
    """Run the lane's own loop.py with this Python; (exit code, output)."""
    result = subprocess.run([sys.executable, "scripts/loop.py", *args], cwd=lane_path(lane), capture_output=True,
                            text=True, env=lane_environment(lane))
    return result.returncode, (result.stdout + result.stderr).strip()


def lane_environment(lane):
    # PWD with the cwd: OpenCode takes its project from $PWD, so an agent started under the
    # main checkout's PWD would edit the main checkout instead of its lane's worktree.
    env = dict(os.environ, PWD=lane["path"])
    env.pop("AUTORESEARCH_TRAIN_COMMAND", None)  # the lane's loop passes its own --train-command
    return env


# ---------------------------------------------------------------------------
# start


def training_command(args, current=None):
    """What each experiment runs: the dispatcher in front of the training command for a cluster."""
    if args.backend == "local":
        return args.train_command  # None: the loop's default (or the task's command), under torchrun for --gpus N > 1
    if current is not None:  # an external task's command starts its own processes on the job's GPUs
        default = list(current.command)
    else:  # experiment.py's (train.py, under torchrun on several GPUs), but for ray with the cluster's Python, not ours
        default = common.default_training_command(args.gpus_per_run)
        default = default if args.backend == "slurm" else ["python", *default[1:]]
    train = args.train_command or shlex.join(default)
    words = [sys.executable, "scripts/dispatch.py", "--backend", args.backend, "--gpus", str(args.gpus_per_run)]
    if args.backend == "slurm":
        words += [f"--partition={args.partition}"] if args.partition else []
        words += [f"--sbatch-option={option}" for option in args.sbatch_option]
    else:
        words += [f"--address={args.address}"] if args.address else []
        words += [f"--env={name}" for name in args.env]
    return shlex.join(words) + " -- " + train


def command_start(args, loop_args):
    if args.count < 1:
        raise common.Refusal("start at least one lane")
    current = task.load()  # a bad autoresearch.toml is refused before any worktree exists
    if current is None and common.load_manifest() is None:  # one preparation for every lane, before any starts
        raise common.Refusal(f"data not prepared: run {common.PREPARE_COMMAND} (offline: "
                             f"{common.PREPARE_COMMAND_OFFLINE}) once, then start the lanes")
    changed = common.changed_tracked_files()
    if changed:
        raise common.Refusal(f"uncommitted changes to tracked files ({', '.join(changed)}): the lanes start from "
                             "the last commit, so commit or revert them first")
    if args.gpus_per_run < 1:
        raise common.Refusal("--gpus-per-run must be at least 1")
    per_run = args.gpus_per_run
    gpus = args.gpu_ids.split(",") if args.gpu_ids else [str(k) for k in range(args.count * per_run)]
    if args.backend == "local" and len(gpus) < args.count * per_run:
        raise common.Refusal(f"--gpu-ids lists {len(gpus)} GPUs for {args.count} lanes of {per_run} GPU(s) each: "
                             "every lane needs GPUs of its own")
    # local: lane k trains on GPUs k*N .. k*N+N-1 of the list (CUDA_VISIBLE_DEVICES): N ranks under
    # torchrun with the default command; a --train-command of its own starts its own processes on them.
    gpus = [",".join(gpus[k * per_run:(k + 1) * per_run]) for k in range(args.count)]
    tag = args.tag or choose_tag()
    if set_file(tag).exists():
        raise common.Refusal(f"lane set {tag} exists already: choose another --tag")
    for k in range(args.count):
        if common.git("rev-parse", "-q", "--verify", f"refs/heads/{common.BRANCH_PREFIX}{tag}-lane{k}", check=False):
            raise common.Refusal(f"branch {common.BRANCH_PREFIX}{tag}-lane{k} already exists: choose another --tag")
    train = training_command(args, current)
    lanes = {"tag": tag, "backend": args.backend, "created_at": common.now_iso(), "train_command": train,
             "start_commit": common.head_commit(), "loop_args": loop_args, "lanes": []}
    if current is not None:  # what status and plot rank the lanes by; every lane's worktree has the same file
        lanes["task"] = {"name": current.name, "metric": current.metric_name, "direction": current.direction,
                         "ledger_columns": list(current.ledger_columns())}
    for k in range(args.count):
        path = LANES_DIR / tag / f"lane{k}"
        common.git("worktree", "add", "-q", "--detach", str(path), "HEAD")
        lanes["lanes"].append({"number": k, "name": f"lane{k}", "path": str(path),
                               "branch": f"{common.BRANCH_PREFIX}{tag}-lane{k}",
                               "gpu": gpus[k] if args.backend == "local" else None})
    common.write_json_atomic(set_file(tag), lanes)
    for lane in lanes["lanes"]:
        options = ["--tag", f"{tag}-lane{lane['number']}", "--background", *loop_args]
        options += ["--train-command", train] if train else []
        options += ["--no-sandbox"] if args.backend != "local" and "--no-sandbox" not in loop_args else []
        options += ["--gpu", lane["gpu"]] if lane["gpu"] is not None else []
        # N ranks under torchrun are train.py's; an external task's command starts its own processes on the N GPUs
        ranks = args.backend == "local" and per_run > 1 and not train and current is None
        options += ["--gpus", str(per_run)] if ranks else []
        options += ["--track", args.track] if args.track else []
        if "optuna" in loop_args and "--study-storage" not in loop_args:  # one study that every lane asks
            options += ["--study-storage", f"sqlite:///{LANES_DIR / tag / 'optuna.db'}", "--study-name", tag]
        code, output = loop(lane, "start", *options)
        if code != 0:
            raise common.Refusal(f"{lane['name']}: loop.py start failed: {output.splitlines()[-1] if output else code}"
                                 f" (the lanes started so far run on: uv run scripts/lanes.py stop --tag {tag} --now)")
    wait_until_started(lanes["lanes"], {})
    where = {"local": f"GPUs {(',' if per_run == 1 else ' | ').join(gpus)}", "slurm": "SLURM", "ray": "Ray"}[args.backend]
    print(f"lanes {tag}: {args.count} loops started on {where}, worktrees in "
          f"{(LANES_DIR / tag).relative_to(common.ROOT)}; uv run scripts/lanes.py status | plot | stop")
    return 0


def choose_tag():
    """Today's date as setup.py names sessions (nov23), with -2, -3 ... when taken."""
    today = datetime.date.today()
    base = f"{today.strftime('%b').lower()}{today.day}"
    tag, suffix = base, 1
    while set_file(tag).exists() or common.git("rev-parse", "-q", "--verify",
                                               f"refs/heads/{common.BRANCH_PREFIX}{tag}-lane0", check=False):
        suffix += 1
        tag = f"{base}-{suffix}"
    return tag


# ---------------------------------------------------------------------------
# status


def lane_ledger(lanes, lane):
    """The lane's ledger rows, in an external task's columns when the set has one."""
    columns = tuple(set_task(lanes)["ledger_columns"]) if set_task(lanes) else None
    return common.read_ledger(lane_path(lane) / "results.tsv", columns)


def lane_status(lanes, lane):
    path = lane_path(lane)
    rows = lane_ledger(lanes, lane)
    code, output = loop(lane, "status", "--json")
    state = json.loads(output) if code == 0 else {}
    best = common.best_ever(rows, metric_direction(lanes))
    jobs = [record for record in dispatch.load_records(path) if record and record["state"] in dispatch.IN_FLIGHT]
    return {"name": lane["name"], "branch": lane["branch"], "path": lane["path"], "gpu": lane["gpu"],
            "running": bool(state.get("running")), "stage": state.get("stage"), "stop_reason": state.get("stop_reason"),
            "experiments": len(common.experiments(rows)), "rows": len(rows),
            "counts": common.status_counts(rows),
            "best": best._asdict() if best else None,
            "jobs_in_flight": [f"{record['backend']} {record.get('job_id') or record['name']}" for record in jobs]}


def gather(tag):
    lanes = load_set(tag)
    per_lane = [lane_status(lanes, lane) for lane in lanes["lanes"]]
    scored = [lane for lane in per_lane if lane["best"]]
    pick = max if metric_direction(lanes) == "higher" else min
    best_lane = pick(scored, key=lambda lane: lane["best"]["val_bpb"]) if scored else None
    total = sum(lane["experiments"] for lane in per_lane)
    until = datetime.datetime.now(datetime.timezone.utc)
    if not any(lane["running"] for lane in per_lane):  # all stopped: the rate up to the last ledger write
        written = [lane_path(lane) / "results.tsv" for lane in lanes["lanes"]]
        times = [path.stat().st_mtime for path in written if path.exists()]
        if times:
            until = datetime.datetime.fromtimestamp(max(times), datetime.timezone.utc)
    hours = (until - common.parse_iso(lanes["created_at"])).total_seconds() / 3600
    status = {"tag": lanes["tag"], "backend": lanes["backend"], "created_at": lanes["created_at"],
              "lanes": per_lane, "experiments": total, "per_hour": round(total / hours, 2) if hours > 0 else None,
              "running": sum(lane["running"] for lane in per_lane),
              "best": dict(best_lane["best"], lane=best_lane["name"]) if best_lane else None}
    if set_task(lanes):  # the best's number is under val_bpb (the ledger row's field), named here
        status.update(task=set_task(lanes)["name"], metric=set_task(lanes)["metric"],
                      direction=metric_direction(lanes), self_reported=True)
    return status


def print_status(status):
    rate = f", {status['per_hour']}/h in total" if status["per_hour"] is not None else ""
    best = status["best"]
    metric = f"{status['metric']} " if status.get("task") else ""  # the built-in val_bpb goes unnamed
    best_text = (f"; best {metric}{best['val_bpb']:.6f} in {best['lane']} ({best['commit']}: {best['description']})"
                 if best else "; nothing kept yet")
    print(f"lanes {status['tag']} ({status['backend']}, {status['running']}/{len(status['lanes'])} running): "
          f"{status['experiments']} experiments{rate}{best_text}")
    if status.get("task"):
        print(f"task {status['task']} (autoresearch.toml: {status['metric']}, {status['direction']} is better, "
              "self-reported)")
    for lane in status["lanes"]:
        state = "running" if lane["running"] else f"stopped ({lane['stop_reason'] or 'no loop'})"
        lane_best = (f"best {metric}{lane['best']['val_bpb']:.6f} ({lane['best']['commit']})" if lane["best"]
                     else "no keep yet")
        gpu = f" gpu {lane['gpu']}" if lane["gpu"] is not None else ""
        jobs = f"; job {', '.join(lane['jobs_in_flight'])}" if lane["jobs_in_flight"] else ""
        print(f"  {lane['name']}{gpu}: {state}, stage {lane['stage']}, {lane['experiments']} experiments, "
              f"{lane_best}{jobs}")


def command_status(args):
    status = gather(args.tag)
    if args.json:
        print(json.dumps(status, sort_keys=True))
    else:
        print_status(status)
    return 0


# ---------------------------------------------------------------------------
# plot: every lane's experiments and kept frontier in one picture


def command_plot(args):
    lanes = load_set(args.tag)
    ledgers = [(lane["name"], lane_ledger(lanes, lane)) for lane in lanes["lanes"]]
    direction = metric_direction(lanes)
    if not any(common.experiments(rows) for _name, rows in ledgers):
        raise common.Refusal("no lane has an experiment yet: nothing to plot")
    from matplotlib.figure import Figure  # here: a second of start-up that a refusal should not pay
    from matplotlib.ticker import MaxNLocator

    import plot

    fig = Figure(figsize=(12, 6), dpi=120)
    ax = fig.subplots()
    best_overall = None
    for index, (name, rows) in enumerate(ledgers):
        color = f"C{index % 10}"
        runs = common.scored(rows)  # a crash or invalid run's 0.0 would look like the best result of all
        numbers = {id(row): n for n, row in enumerate(common.experiments(rows), start=1)}
        ax.scatter([numbers[id(row)] for row in runs], [row.val_bpb for row in runs], s=10, color=color, alpha=0.3)
        frontier, running = [], None
        for row in runs:
            if row.status == "keep" and (running is None or common.beats(row.val_bpb, running, direction)):
                running = row.val_bpb
                frontier.append((numbers[id(row)], row.val_bpb))
        if frontier:
            frontier.append((len(numbers), frontier[-1][1]))
            ax.step(*zip(*frontier), where="post", color=color, linewidth=1.5, label=f"{name} best {running:.6f}")
            if best_overall is None or common.beats(running, best_overall[1], direction):
                best_overall = (name, running, frontier[-2][0])
    if best_overall:
        ax.scatter([best_overall[2]], [best_overall[1]], marker="*", s=200, color="black", zorder=4,
                   label=f"global best {best_overall[1]:.6f} ({best_overall[0]})")
    ax.set_xlabel("experiment (in its lane)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if set_task(lanes):  # better stays down: the axis turned over where higher is better, as plot.py does
        ax.set_ylabel(f"{set_task(lanes)['metric']} ({direction} is better, self-reported)")
        if direction == "higher":
            ax.invert_yaxis()
    else:
        ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(alpha=0.25)
    ax.legend(loc="upper right", fontsize=8)
    total = sum(len(common.experiments(rows)) for _name, rows in ledgers)
    ax.set_title(f"autoresearch lanes {lanes['tag']} ({lanes['backend']}): {len(ledgers)} lanes, {total} experiments")
    fig.tight_layout()
    output = Path(args.output or LANES_DIR / f"{lanes['tag']}-progress.png").resolve()
    plot.save(fig, output)
    print(f"wrote {os.path.relpath(output)} ({len(ledgers)} lanes, {total} experiments)")
    return 0


# ---------------------------------------------------------------------------
# stop and resume


def loop_process(lane):
    """The pid of the lane's loop while it runs on this machine, else None."""
    state = common.read_json(lane_path(lane) / "runs" / "loop" / "state.json") or {}
    process = state.get("process") or {}
    pid = process.get("pid")
    if pid and process.get("boot_id") == common.boot_id() and common.pid_alive(pid) and not zombie(pid):
        return pid
    return None


def zombie(pid):
    """A killed loop stays a zombie until its parent reaps it (never, under some container inits)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def command_stop(args):
    lanes = load_set(args.tag)
    for lane in lanes["lanes"]:
        loop(lane, "stop")  # the STOP file: no new stage starts, whatever happens below
    if not args.now:
        print(f"lanes {lanes['tag']}: each loop stops after its current stage (STOP file); "
              "--now stops them at once and cancels their jobs")
        return 0
    loops = {lane["name"]: loop_process(lane) for lane in lanes["lanes"]}
    for pid in filter(None, loops.values()):
        try:  # the detached loop leads its process group; experiment.py in it stops training on SIGTERM
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while time.monotonic() < deadline and any(loop_process(lane) for lane in lanes["lanes"]):
        time.sleep(0.2)
    cancelled, left = [], []
    for lane in lanes["lanes"]:
        pid = loop_process(lane)
        if pid:
            runner.stop_process_group(pid)
            left.append(lane["name"])
        cancelled += dispatch.cancel_in_flight(lane_path(lane), reason="lanes.py stop --now")
        pending = common.read_json(lane_path(lane) / "runs" / "pending.json") or {}
        pgid = pending.get("training_pgid")  # local training of a killed experiment.py
        if pgid and pending.get("boot_id") == common.boot_id() and runner.process_group_alive(pgid):
            runner.stop_process_group(pgid)
    extra = f"; cancelled {len(cancelled)} job(s) left behind" if cancelled else ""
    forced = f"; killed {', '.join(left)} after {STOP_WAIT_SECONDS} s" if left else ""
    print(f"lanes {lanes['tag']}: {sum(1 for pid in loops.values() if pid)} loops stopped{extra}{forced}; "
          "resume: uv run scripts/lanes.py resume")
    return 0


def wait_until_started(lanes, before):
    """Until each lane's detached loop runs (a new pid in its state file), or START_WAIT_SECONDS."""
    deadline = time.monotonic() + START_WAIT_SECONDS
    waiting = list(lanes)
    while waiting and time.monotonic() < deadline:
        waiting = [lane for lane in waiting if loop_process(lane) in (None, before.get(lane["name"]))]
        time.sleep(0.1)


def command_resume(args):
    lanes = load_set(args.tag)
    resumed, before = [], {}
    for lane in lanes["lanes"]:
        if loop_process(lane):
            continue
        state = common.read_json(lane_path(lane) / "runs" / "loop" / "state.json") or {}
        before[lane["name"]] = (state.get("process") or {}).get("pid")
        code, output = loop(lane, "resume", "--background")
        if code != 0:
            raise common.Refusal(f"{lane['name']}: loop.py resume failed: {output.splitlines()[-1] if output else code}")
        resumed.append(lane["name"])
    wait_until_started([lane for lane in lanes["lanes"] if lane["name"] in resumed], before)
    print(f"lanes {lanes['tag']}: resumed {', '.join(resumed) or 'none (all running)'}")
    return 0


# ---------------------------------------------------------------------------
# Command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    loop_args = []
    if "--" in argv:
        argv, loop_args = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(description="Parallel research lanes: N loops in N worktrees, one view.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="create N worktrees and branches and start a loop in each; "
                                "options after -- go to every loop.py start (e.g. -- --max-experiments 20)")
    start.add_argument("count", type=int, metavar="N", help="number of lanes")
    start.add_argument("--backend", choices=BACKENDS, required=True,
                       help="where training runs: local (one GPU per lane), slurm or ray (a job per experiment)")
    start.add_argument("--tag", help="name of the set; lane k is branch autoresearch/<tag>-lane<k> (default: today)")
    start.add_argument("--train-command", metavar="CMD", help="the training command (default: train.py with this "
                       "Python; for ray, `python train.py` with the cluster's Python)")
    start.add_argument("--track", choices=("mlflow", "wandb", "none"),
                       help="record every lane's experiments in MLflow or W&B (loop.py's --track)")
    start.add_argument("--gpu-ids", metavar="LIST", help="local: the GPUs the lanes share out, comma-separated, "
                       "--gpus-per-run of them per lane in order (default 0..lanes*per_run-1)")
    start.add_argument("--gpus-per-run", type=int, default=1, metavar="N",
                       help="GPUs per experiment (default 1): N > 1 trains under torchrun, N ranks of DDP; "
                            "slurm asks --gres=gpu:N, ray entrypoint_num_gpus=N")
    start.add_argument("--partition", help="slurm: the partition")
    start.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                       help="slurm: an extra sbatch option (repeatable), e.g. --sbatch-option=--account=lab")
    start.add_argument("--address", help="ray: the Jobs API address (default: $RAY_ADDRESS)")
    start.add_argument("--env", action="append", default=[], metavar="NAME",
                       help="ray: also pass this environment variable to each job (repeatable)")
    for name, text in (("status", "each lane's best and count, the global best and its lane, experiments per hour"),
                       ("plot", "one picture with every lane's experiments and kept frontier"),
                       ("stop", "stop every lane (after its current stage; --now: at once, cancelling jobs)"),
                       ("resume", "resume every lane whose loop is not running")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--tag", help="the lane set (default: the newest)")
        if name == "status":
            command.add_argument("--json", action="store_true", help="one JSON object instead of text")
        if name == "plot":
            command.add_argument("--output", help="where to write the picture (default: runs/lanes/<tag>-progress.png)")
        if name == "stop":
            command.add_argument("--now", action="store_true",
                                 help="terminate the loops now (the run in flight is recorded as a crash on "
                                 "resume) and cancel their cluster jobs")
    args = parser.parse_args(argv)
    if args.command == "start":
        return command_start(args, loop_args)
    if loop_args:
        raise common.Refusal(f"{args.command} takes no options after --")
    return {"status": command_status, "plot": command_plot, "stop": command_stop, "resume": command_resume}[
        args.command](args)


if __name__ == "__main__":
    common.run_main(main)
