"""Experiment tracking: every experiment as a run in MLflow or Weights & Biases. Optional, off by default.

Turn it on for a session with `--track mlflow|wandb` on setup.py, loop.py start or lanes.py start,
or AUTORESEARCH_TRACK at setup; the choice is recorded in runs/session.json. Install the libraries
with `uv sync --group tracking`.

- MLflow: the SQLite store runs/mlflow.db of the main worktree (so lanes land in one database), or
  the server in MLFLOW_TRACKING_URI. Browse with
  `uv run --group tracking mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`.
- W&B: offline under runs/wandb/ unless WANDB_API_KEY is set (then online); `wandb sync
  runs/wandb/wandb/offline-run-*` uploads an offline night later. WANDB_PROJECT names the project
  (default autoresearch).

One tracker experiment (W&B: group) per session or lane, one run per experiment, confirmation or
noise run, carrying
    params     train.py's hyperparameter block as trained (parsed with ast), description,
               hypothesis (from the loop's record), profile, GPU count;
    metrics    training loss per step (run.log's `step N | loss X` lines), val_bpb as judged,
               the referee's score, tokens/s, MFU, peak memory, training and wall seconds, and
               the saved model's size;
    tags       commit, parent, status, verdict, lane, kind; confirmation and noise runs point to
               their experiment's run (mlflow.parentRunId; W&B: config `parent_run`);
    artifacts  the diff and summary.json.
Decisions made later (keep, discard, crash, backtrack) update the run's status tag.

The helpers never wait for a tracker. experiment.py, decide.py and setup.py call submit(), which
checks in milliseconds that the tracker can work at all (the library is installed; a server
answers a TCP connect within PROBE_SECONDS), then queues an event in runs/tracking/queue/ and
starts a detached worker (`python scripts/tracking.py work`) that logs the queue in order, each
event within EVENT_SECONDS, and exits when the queue is empty. A tracker that is down or
misconfigured costs one warning line on stderr and a note in summary.json ("tracking"); the
worker's own failures go to runs/tracking/tracking.log and runs/tracking/runs.json.

Usage:
    uv run scripts/tracking.py work          # what submit() starts; safe to run by hand
    uv run scripts/tracking.py status        # runs logged, failures, what is still queued
"""

import ast
import contextlib
import fcntl
import importlib.util
import json
import math
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TRACKERS = ("mlflow", "wandb")
ENVIRONMENT_VARIABLE = "AUTORESEARCH_TRACK"
TRACKING_DIR = common.RUNS_DIR / "tracking"
QUEUE_DIR = TRACKING_DIR / "queue"  # one JSON event per file, processed in name order
RUNS_FILE = TRACKING_DIR / "runs.json"  # run folder -> {tracker run id, error, synced_at}
LOG_FILE = TRACKING_DIR / "tracking.log"  # the worker's output and its warnings
WORKER_LOCK = TRACKING_DIR / "worker.lock"
PROBE_SECONDS = 0.5  # a server that does not accept a connection by then is down for this experiment
EVENT_SECONDS = 120  # the worker's limit per event (W&B's first offline start takes seconds)
LOSS_LINE = re.compile(r"^step (\d+) \| loss ([-+0-9.eE]+|nan|inf)\b")
METRIC_KEYS = {"tokens_per_sec": "tokens_per_sec", "mfu_percent": "mfu_percent", "peak_vram_mb": "peak_vram_mb",
               "training_seconds": "training_seconds", "num_steps": "num_steps", "num_params_M": "num_params_M"}


# ---------------------------------------------------------------------------
# The session's choice, and the quick check every helper makes before queueing


def choose(option):
    """The tracker for a new session: the option, else $AUTORESEARCH_TRACK; None when off.
    A Refusal when the name is unknown or its library is not installed."""
    name = (option or os.environ.get(ENVIRONMENT_VARIABLE) or "none").strip().lower()
    if name in ("", "none", "off"):
        return None
    if name not in TRACKERS:
        raise common.Refusal(f"--track {name}: choose mlflow, wandb or none")
    if importlib.util.find_spec(name) is None:
        raise common.Refusal(f"--track {name} needs the tracking libraries: uv sync --group tracking")
    return name


def mlflow_uri():
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{main_worktree() / 'runs' / 'mlflow.db'}"


def main_worktree():
    """The repository's main worktree (lanes are worktrees of it): where the local MLflow store lives."""
    common_dir = common.git("rev-parse", "--path-format=absolute", "--git-common-dir", check=False)
    return Path(common_dir).parent if common_dir and Path(common_dir).name == ".git" else common.ROOT


def target(tracker):
    if tracker == "mlflow":
        return mlflow_uri()
    online = bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE") != "offline"
    return "wandb online" if online else f"wandb offline in {os.path.relpath(wandb_dir(), common.ROOT)}"


def wandb_dir():
    return Path(os.environ.get("WANDB_DIR") or common.RUNS_DIR / "wandb")


def problem_with(tracker):
    """Why `tracker` cannot record now (None when it can): a missing library, or a server that does
    not accept a connection within PROBE_SECONDS. Costs milliseconds, at most PROBE_SECONDS."""
    if tracker not in TRACKERS:
        return f"unknown tracker {tracker!r}"
    if importlib.util.find_spec(tracker) is None:
        return f"{tracker} is not installed (uv sync --group tracking)"
    if tracker == "mlflow":
        uri = mlflow_uri()
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme in ("http", "https"):
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            try:
                socket.create_connection((parsed.hostname, port), timeout=PROBE_SECONDS).close()
            except OSError as error:
                return f"MLflow server {uri} unreachable ({error.strerror or error})"
        elif parsed.scheme not in ("sqlite", "file", "") and not uri.startswith(("postgresql", "mysql", "databricks")):
            return f"MLFLOW_TRACKING_URI {uri!r} is not a URI MLflow knows"
    return None


def check(session=None):
    """The note for summary.json: None when tracking is off, else {tracker, target, state} where
    state is queued, or not recorded with the problem (also printed as one warning line)."""
    session = session if session is not None else common.load_session() or {}
    tracker = session.get("track")
    if not tracker:
        return None
    problem = problem_with(tracker)
    if problem:
        print(f"tracking: not recorded in {tracker}: {problem}", file=sys.stderr, flush=True)
        return {"tracker": tracker, "target": target(tracker), "state": "not recorded", "problem": problem}
    return {"tracker": tracker, "target": target(tracker), "state": "queued"}


def submit(run_dir, note=None, **event):
    """Queue run_dir (its summary.json as it is now, or as the worker finds it) for the tracker and
    start the worker. `note`: what check() said for this experiment (checked again when None).
    Never raises: tracking must not fail an experiment."""
    try:
        note = note or check()
        if not note or note["state"] != "queued":
            return note
        run_dir = Path(run_dir)
        event = dict(event, kind=event.get("kind", "sync"), run=run_dir.name, tracker=note["tracker"],
                     artifact_bytes=artifact_bytes(run_dir), submitted_at=common.now_iso())
        enqueue(event)
        start_worker()
    except Exception as error:  # noqa: BLE001 (a broken tracker is a warning, never a failed experiment)
        print(f"tracking: not recorded: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    return note


def artifact_bytes(run_dir):
    """The size of the model training saved (out/model.pt2), now: a discard deletes it. Never
    followed through a link, as training wrote that folder."""
    try:
        status = os.lstat(common.model_path(run_dir))
    except OSError:
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def submit_backtrack(target_commit, rows):
    """A backtrack to `target_commit`: the kept runs it rewinds over get status `backtracked`."""
    lineage = common.kept_lineage(rows)
    where = [i for i, row in enumerate(lineage) if row.commit == target_commit]
    abandoned = [row.commit for row in lineage[where[-1] + 1:]] if where else []
    if abandoned:
        submit(common.RUNS_DIR, kind="backtrack", target=target_commit, abandoned=abandoned)


def enqueue(event):
    QUEUE_DIR.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}.json"
    common.write_json_atomic(QUEUE_DIR / name, event)


def start_worker():
    """A detached `tracking.py work` (its own session, output to tracking.log); it exits by itself."""
    TRACKING_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_FILE, "ab") as log:
        subprocess.Popen([sys.executable, os.path.abspath(__file__), "work"], cwd=common.ROOT,
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


# ---------------------------------------------------------------------------
# What a run carries


def hyperparameters(source, profile):
    """train.py's UPPER_CASE settings in effect under `profile` (an `if PROFILE ...:` block that
    applies, common.profile_block_applies, replaces the top-level values, as in train.py), parsed with ast: numbers, strings, tuples."""
    found = {}

    def take(statement):
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                and isinstance(statement.targets[0], ast.Name) and statement.targets[0].id.isupper():
            value = constant(statement.value)
            if value is not None:
                found[statement.targets[0].id] = value

    for statement in ast.parse(source).body:
        take(statement)
        if isinstance(statement, ast.If) and common.profile_block_applies(ast.unparse(statement.test), profile):
            for inner in statement.body:
                take(inner)
    return found


def constant(node):
    """The value of a literal expression (2**19 and 1e-3 included), or None."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.Mult, ast.Div)):
        left, right = constant(node.left), constant(node.right)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)):
            try:
                return left ** right if isinstance(node.op, ast.Pow) else left * right if isinstance(node.op, ast.Mult) \
                    else left / right
            except (ZeroDivisionError, OverflowError):
                return None
    return None


def losses(run_log):
    """[(step, loss)] from the `step NNNNN | loss X` lines train.py prints."""
    found = []
    try:
        text = Path(run_log).read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        match = LOSS_LINE.match(line)
        if match:
            value = float(match.group(2))
            if math.isfinite(value):  # MLflow refuses NaN; a diverged run's last loss is in run.log
                found.append((int(match.group(1)), value))
    return found


def hypothesis_of(run_name):
    """The loop's hypothesis for the experiment that ran in runs/<run_name>, if the loop ran it."""
    for path in sorted((common.RUNS_DIR / "loop").glob("[0-9][0-9][0-9][0-9]/iteration.json"), reverse=True):
        record = common.read_json(path) or {}
        runs = list(record.get("runs") or []) + ([record["run"]] if record.get("run") else [])
        if any(str(run.get("run_dir", "")).endswith(run_name) for run in runs):
            return (record.get("proposal") or {}).get("hypothesis")
    return None


def lane_of(session):
    match = re.search(r"-(lane\d+)$", session.get("tag") or "")
    return match.group(1) if match else "main"


def gpu_count():
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([gpu for gpu in visible.split(",") if gpu.strip() and gpu.strip() != "-1"])
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


def describe_run(run_name, event):
    """Everything a tracker run carries, from the run folder, its summary and the session."""
    run_dir = common.RUNS_DIR / run_name
    summary = common.read_json(run_dir / "summary.json") or {}
    session = common.load_session() or {}
    commit = summary.get("commit") or ""
    source = common.git("show", f"{commit}:train.py", check=False) if commit else ""
    kind = summary.get("kind", "experiment")
    profile = summary.get("profile") or session.get("profile")
    try:
        params = hyperparameters(source, profile) if source else {}
    except SyntaxError:
        params = {}
    params = {name: value if isinstance(value, (int, float, str)) else json.dumps(value)
              for name, value in params.items()}
    hypothesis = hypothesis_of(run_name) if kind == "experiment" else None
    params.update(description=summary.get("description"), profile=profile, gpu_count=gpu_count(),
                  seed=summary.get("seed"), **({"hypothesis": hypothesis} if hypothesis else {}))
    metrics = {"val_bpb": summary.get("val_bpb"), "wall_seconds": summary.get("wall_seconds"),
               "artifact_bytes": event.get("artifact_bytes")}
    for key, name in METRIC_KEYS.items():
        metrics[name] = (summary.get("metrics") or {}).get(key)
    referee = ((summary.get("samples") or [{}])[0] or {}).get("referee") or {}
    metrics["referee_bpb"] = referee.get("bpb")
    metrics = {key: float(value) for key, value in metrics.items() if common.is_finite_number(value)}
    decision = (summary.get("decision") or {}).get("status")
    status = decision or ("pending" if summary.get("status") == "ok" and kind == "experiment" else summary.get("status"))
    tags = {"commit": commit[:7], "parent": (summary.get("parent") or "")[:7], "status": status or "unknown",
            "verdict": summary.get("verdict") or "-", "lane": lane_of(session), "kind": kind, "run": run_name,
            "session": session.get("tag") or "-"}
    parent = summary.get("confirms") if kind == "confirmation" else None
    children = [sample["run"] for sample in summary.get("samples") or [] if sample.get("noise")]
    children += list(summary.get("confirmations") or [])
    name = f"{run_name} {summary.get('description') or ''}".strip()[:250]
    return {"name": name, "params": params, "metrics": metrics, "tags": tags, "losses": losses(run_dir / "run.log"),
            "summary_path": run_dir / "summary.json", "diff": summary.get("diff") or "", "parent": parent,
            "children": children, "failed": summary.get("status") not in (None, "ok"),
            "experiment": common.BRANCH_PREFIX + (session.get("tag") or "untagged")}


# ---------------------------------------------------------------------------
# MLflow


class MLflowTracker:
    def __init__(self):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the worker, not the experiment, would wait
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.uri = mlflow_uri()
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)

    def experiment_id(self, name):
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        local = self.uri.startswith("sqlite:")
        location = (main_worktree() / "runs" / "mlflow-artifacts").as_uri() if local else None
        return self.client.create_experiment(name, artifact_location=location)

    def sync(self, run, known):
        from mlflow.entities import Metric, Param, RunTag

        client, now = self.client, int(time.time() * 1000)
        if known is None:
            created = client.create_run(self.experiment_id(run["experiment"]), run_name=run["name"])
            run_id = created.info.run_id
            params = [Param(key, str(value)[:6000]) for key, value in run["params"].items() if value is not None]
            series = [Metric("train_loss", loss, now, step) for step, loss in run["losses"]]
            for start in range(0, max(len(params), len(series)), 100):
                client.log_batch(run_id, params=params[start:start + 100], metrics=series[start:start + 900])
            logged_params = sorted(run["params"])
        else:
            run_id, logged_params = known["run_id"], known.get("params") or []
            late = [Param(key, str(value)[:6000]) for key, value in run["params"].items()
                    if value is not None and key not in logged_params]  # e.g. the hypothesis, recorded after
            if late:
                client.log_batch(run_id, params=late)
                logged_params = sorted(set(logged_params) | {param.key for param in late})
        metrics = [Metric(key, value, now, 0) for key, value in run["metrics"].items()]
        tags = [RunTag(key, str(value)) for key, value in run["tags"].items()]
        client.log_batch(run_id, metrics=metrics, tags=tags)
        self.upload(run_id, run)
        client.set_terminated(run_id, "FAILED" if run["failed"] else "FINISHED")
        return {"run_id": run_id, "params": logged_params}

    def upload(self, run_id, run):
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            if run["diff"]:
                (Path(folder) / "diff.patch").write_text(run["diff"])
                self.client.log_artifact(run_id, str(Path(folder) / "diff.patch"))
        if run["summary_path"].is_file():
            self.client.log_artifact(run_id, str(run["summary_path"]))

    def link(self, child_id, parent_id):
        self.client.set_tag(child_id, "mlflow.parentRunId", parent_id)

    def set_tags(self, run_id, tags):
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))


# ---------------------------------------------------------------------------
# Weights & Biases


class WandbTracker:
    def __init__(self):
        if not (os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "offline"):
            os.environ["WANDB_MODE"] = "offline"  # no network needed; `wandb sync` uploads later
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        wandb_dir().mkdir(parents=True, exist_ok=True)
        import wandb

        self.wandb = wandb

    def start(self, run_id, run, config=None, tags=None):
        return self.wandb.init(project=os.environ.get("WANDB_PROJECT", "autoresearch"), group=run["experiment"],
                               name=run["name"], id=run_id, resume="allow", dir=str(wandb_dir()), config=config,
                               tags=tags, settings=self.wandb.Settings(console="off", x_disable_stats=True))

    def tag_list(self, tags):
        return [f"{key}:{value}"[:64] for key, value in tags.items() if key in ("status", "verdict", "lane", "kind")]

    def sync(self, run, known):
        run_id = known["run_id"] if known else secrets.token_hex(4)  # W&B's own ids are 8 such characters
        config = dict(run["params"], commit=run["tags"]["commit"], parent=run["tags"]["parent"],
                      run_folder=run["tags"]["run"])
        active = self.start(run_id, run, config=config, tags=self.tag_list(run["tags"]))
        try:
            if known is None:
                for step, loss in run["losses"]:
                    active.log({"train_loss": loss}, step=step)
                artifact = self.wandb.Artifact(f"run-{run['tags']['run']}", type="experiment")
                if run["summary_path"].is_file():
                    artifact.add_file(str(run["summary_path"]))
                if run["diff"]:
                    with artifact.new_file("diff.patch") as handle:
                        handle.write(run["diff"])
                active.log_artifact(artifact)
            active.summary.update(dict(run["metrics"], **{f"tag_{k}": v for k, v in run["tags"].items()}))
        finally:
            active.finish(exit_code=1 if run["failed"] else 0)
        return {"run_id": run_id}

    def link(self, child_id, parent_id):
        active = self.start(child_id, {"experiment": None, "name": None})
        try:
            active.config.update({"parent_run": parent_id}, allow_val_change=True)
        finally:
            active.finish()

    def set_tags(self, run_id, tags):
        active = self.start(run_id, {"experiment": None, "name": None})
        try:
            active.tags = tuple(tag for tag in active.tags if not tag.startswith("status:")) + tuple(self.tag_list(tags))
            active.summary.update({f"tag_{k}": v for k, v in tags.items()})
        finally:
            active.finish()


# ---------------------------------------------------------------------------
# The worker


class Timeout(Exception):
    pass


def on_alarm(_signum, _frame):
    raise Timeout(f"no answer within {EVENT_SECONDS} s")


@contextlib.contextmanager
def store_lock(event):
    """Lanes' workers share the local MLflow SQLite file: one writer at a time (creating its schema
    twice at once fails), through a lock file beside it. Servers and W&B need none."""
    uri = mlflow_uri() if event.get("tracker") == "mlflow" else ""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri[len("sqlite:///"):] + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def process(event, trackers, runs):
    tracker = trackers.get(event["tracker"])
    if tracker is None:
        tracker = trackers[event["tracker"]] = MLflowTracker() if event["tracker"] == "mlflow" else WandbTracker()

    def key(name):
        return f"{event['tracker']}:{name}"

    if event["kind"] == "backtrack":
        for name, entry in runs.items():
            if name.startswith(event["tracker"] + ":") and entry.get("commit") in event["abandoned"] and entry.get("run_id"):
                tracker.set_tags(entry["run_id"], {"status": "backtracked", "backtracked_to": event["target"]})
        return
    run = describe_run(event["run"], event)
    known = runs.get(key(event["run"]))
    known = known if known and known.get("run_id") else None
    result = tracker.sync(run, known)
    runs[key(event["run"])] = dict(result, commit=run["tags"]["commit"], synced_at=common.now_iso(), error=None)
    parent = runs.get(key(run["parent"])) if run["parent"] else None
    if parent and parent.get("run_id") and not known:
        tracker.link(result["run_id"], parent["run_id"])
    for child in run["children"]:  # noise and confirmation runs logged before this experiment's run
        entry = runs.get(key(child))
        if entry and entry.get("run_id") and entry.get("parent") != result["run_id"]:
            tracker.link(entry["run_id"], result["run_id"])
            entry["parent"] = result["run_id"]


def work():
    """Log every queued event in order, then exit; a second worker leaves the queue to the first."""
    TRACKING_DIR.mkdir(parents=True, exist_ok=True)
    trackers = {}
    signal.signal(signal.SIGALRM, on_alarm)
    while any(QUEUE_DIR.glob("*.json")):
        with open(WORKER_LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # the running worker takes this event too (it checks the queue after unlocking)
            for path in sorted(QUEUE_DIR.glob("*.json")):
                event = common.read_json(path)
                runs = common.read_json(RUNS_FILE) or {}
                if event:
                    signal.alarm(EVENT_SECONDS)
                    try:
                        with store_lock(event):
                            process(event, trackers, runs)
                    except Exception as error:  # noqa: BLE001 (one warning line; the next event still goes)
                        line = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
                        print(f"{common.now_iso()} tracking: {event.get('run')} not recorded in "
                              f"{event.get('tracker')}: {line}", flush=True)
                        entry = runs.setdefault(f"{event.get('tracker')}:{event.get('run')}", {})
                        entry.update(error=line, failed_at=common.now_iso())
                    finally:
                        signal.alarm(0)
                    common.write_json_atomic(RUNS_FILE, runs)
                path.unlink(missing_ok=True)
    return 0


def status():
    runs = common.read_json(RUNS_FILE) or {}
    failed = {name: entry["error"] for name, entry in runs.items() if entry.get("error")}
    queued = len(list(QUEUE_DIR.glob("*.json"))) if QUEUE_DIR.is_dir() else 0
    print(f"tracking: {len(runs) - len(failed)} runs logged, {len(failed)} failed, {queued} queued")
    for name, error in sorted(failed.items()):
        print(f"  {name}: {error}")
    return 0


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Experiment tracking (MLflow, W&B): the queue's worker and its status.")
    parser.add_argument("command", choices=("work", "status"),
                        help="work: log the queued events, then exit; status: what was logged, failed, queued")
    args = parser.parse_args(argv)
    return work() if args.command == "work" else status()


if __name__ == "__main__":
    common.run_main(main)
