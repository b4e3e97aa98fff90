"""Send one training run to a cluster and behave like the training process itself.

experiment.py runs this as its training command (AUTORESEARCH_TRAIN_COMMAND or --train-command),
so every guarantee of a local run carries over unchanged: the job's log streams to stdout (that
is, into runs/<NNNN>-<commit7>/run.log, where the summary block is parsed and a crash triaged),
the exit code is the job's, and when experiment.py's hard timeout or a stop sends SIGTERM, the
job is cancelled (scancel, or the Jobs API's stop) before this exits: nothing is left running.

Each job is recorded in runs/jobs/<key>.json of the lane's worktree, the key naming the commit,
seed and command, before it is submitted and under a name the engine also knows (SLURM's job
name, Ray's submission id). If the loop and everything under it is killed, the job is found
again: the same run started again attaches to it (even when it has finished meanwhile) instead
of submitting a second one, and any other run started in this worktree cancels it first.

Backends:
    slurm  sbatch --gres=gpu:N with a time limit from the prepared profile (a backstop for when
           nobody is left to cancel), watched with squeue/scontrol; assumes a shared filesystem,
           as every SLURM cluster has: the job runs in this worktree, its log is read from there.
    ray    the Ray Jobs API: entrypoint_num_gpus=N, this worktree as working_dir, the
           AUTORESEARCH_* variables (and --env NAME ones) passed through; address from --address,
           else $RAY_ADDRESS, else http://127.0.0.1:8265. The cluster's Python must have the
           project's dependencies, and each node the prepared data at AUTORESEARCH_CACHE.

Usage:
    python scripts/dispatch.py --backend slurm [--partition P] [--gpus N] [--time-limit MIN]
                               [--sbatch-option OPT ...] -- python train.py
    python scripts/dispatch.py --backend ray [--address URL] [--gpus N] [--env NAME ...] -- python train.py
"""

import argparse
import hashlib
import logging
import math
import os
import shlex
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import task  # noqa: E402

BACKENDS = ("slurm", "ray")
JOBS_DIRECTORY = "runs/jobs"  # under a worktree: one JSON record (and for slurm, script and log) per job
POLL_SECONDS = 0.5  # between state checks: half of it, on average, is added to each run's end
CANCEL_WAIT_SECONDS = 4.0  # experiment.py sends SIGKILL 5 s after SIGTERM: cancel within that
TIME_LIMIT_MARGIN_SECONDS = 180  # experiment.py's default timeout (2 x budget + 120 s), plus a minute
DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"
IN_FLIGHT = ("submitting", "submitted")  # record states whose job may still be queued or running
# Paths a Ray job never needs; Ray also leaves out what .gitignore lists (runs/, .venv/, results.tsv).
RAY_EXCLUDES = [".git", "runs", "node_modules", ".venv", "*.png"]


class Cancelled(BaseException):
    """This process got SIGTERM, SIGINT or SIGHUP: cancel the job, then exit."""


CANCEL_SIGNAL = []  # the signal that asked for the cancel, once one has


def raise_cancelled(signum, _frame):
    # Once: the stop that follows must not be cut short by the next signal (experiment.py signals
    # the run's process group and then each of its processes, so a second SIGTERM is the rule).
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    CANCEL_SIGNAL.append(signum)
    raise Cancelled(signum)


def check_cancelled():
    """Raise Cancelled if a signal asked for it. The handler raises too, but an exception raised
    while a finalizer runs (a garbage-collected HTTP connection closing) is printed and dropped by
    Python, which once left a job running: the loops check again at every turn."""
    if CANCEL_SIGNAL:
        raise Cancelled(CANCEL_SIGNAL[0])


def say(text):
    """One line into the run's log (stdout): what was submitted, attached to or cancelled."""
    sys.stdout.write(f"dispatch: {text}\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# Job records: runs/jobs/<key>.json in the lane's worktree


def jobs_dir(root):
    return Path(root) / JOBS_DIRECTORY


def job_key(root, commit, seed, command, backend):
    """The same experiment (commit, seed, command) of one worktree on one backend gives the same key.
    Lanes start from the same commit: the worktree keeps their keys apart."""
    text = "\0".join([str(root), commit, str(seed), shlex.join(command), backend])
    return f"{commit[:7]}-s{seed}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def save_record(root, record):
    record["updated_at"] = common.now_iso()
    common.write_json_atomic(jobs_dir(root) / f"{record['key']}.json", record)


def load_records(root):
    return [common.read_json(path) for path in sorted(jobs_dir(root).glob("*.json"))]


def backend_for(record):
    return {"slurm": Slurm, "ray": Ray}[record["backend"]](record.get("options") or {})


def cancel_in_flight(root, keep=None, reason="stopped"):
    """Cancel every job of this worktree still queued or running (except the record `keep`);
    returns their names. Used before a new submission, and by lanes.py stop."""
    cancelled = []
    for record in load_records(root):
        if record and record["state"] in IN_FLIGHT and record["key"] != keep:
            backend_for(record).cancel(record, Path(root))
            record.update(state="cancelled", reason=reason, finished_at=common.now_iso())
            save_record(root, record)
            cancelled.append(record["name"])
    return cancelled


# ---------------------------------------------------------------------------
# SLURM: sbatch, squeue/scontrol, scancel. Shared filesystem: the job writes its log and exit
# code beside the record, so both survive the job leaving the queue.

BATCH_SCRIPT = """#!/bin/bash
# Written by scripts/dispatch.py: one training run of {root}
echo "dispatch: slurm job $SLURM_JOB_ID on ${{SLURMD_NODENAME:-$(hostname)}}, CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
{command}
code=$?
echo $code > {exit_file}.tmp && mv {exit_file}.tmp {exit_file}
exit $code
"""


def run_tool(*args):
    """(exit code, stdout) of a SLURM command; a missing command is a Refusal, not a traceback."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise common.Refusal(f"{args[0]} not found: the slurm backend needs the SLURM client commands") from None
    return result.returncode, result.stdout.strip() + ("\n" + result.stderr.strip() if result.returncode else "")


class Slurm:
    def __init__(self, options):
        self.options = options

    def files(self, record, root):
        base = jobs_dir(root) / record["name"]
        return base.with_suffix(".sh"), base.with_suffix(".log"), base.with_suffix(".exit")

    def submit(self, record, root, command):
        script, log, exit_file = self.files(record, root)
        script.write_text(BATCH_SCRIPT.format(root=root, command=shlex.join(command),
                                              exit_file=shlex.quote(str(exit_file))))
        args = ["sbatch", "--parsable", f"--job-name={record['name']}", f"--output={log}", f"--chdir={root}",
                f"--gres=gpu:{self.options['gpus']}", f"--time={self.options['time_limit']}", "--export=ALL"]
        if self.options.get("partition"):
            args.append(f"--partition={self.options['partition']}")
        args += self.options.get("sbatch_options") or []
        code, output = run_tool(*args, str(script))
        if code != 0:
            raise common.Refusal(f"sbatch failed: {output.splitlines()[-1] if output else code}")
        return output.split(";")[0].strip()

    def find(self, record, root):
        """The job's id while SLURM still lists it, or once it has left a result; else None."""
        code, output = run_tool("squeue", "-h", "-n", record["name"], "-o", "%i")
        if code == 0 and output:
            return output.split()[0]
        return record.get("job_id") if self.files(record, root)[2].exists() else None

    def state(self, record):
        """PENDING, RUNNING, ... while squeue lists the job under our name; None once it has left."""
        code, output = run_tool("squeue", "-h", "-j", record["job_id"], "-o", "%T %j")
        if code != 0 or not output:
            return None
        state, name = (output.split() + [""])[:2]
        return state if name == record["name"] else None  # job ids restart when slurmctld does

    def running(self, record, root):
        # The exit file is written the moment the command ends, seconds before squeue lets go of the job.
        return not self.files(record, root)[2].exists() and self.state(record) is not None

    def started(self, record, root):
        return self.state(record) not in ("PENDING", "CONFIGURING", None) or self.files(record, root)[1].exists()

    def read_log(self, record, root, offset):
        _script, log, _exit = self.files(record, root)
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return b""

    def exit_code(self, record, root):
        _script, _log, exit_file = self.files(record, root)
        for _ in range(10):  # the file lands a moment after the job leaves squeue on a slow NFS
            try:
                return int(exit_file.read_text().strip()), None
            except (FileNotFoundError, ValueError):
                time.sleep(0.2)
        _code, output = run_tool("scontrol", "-o", "show", "job", record["job_id"])
        fields = dict(item.split("=", 1) for item in output.split() if "=" in item)
        return 1, f"slurm job {record['job_id']} ended {fields.get('JobState', 'without an exit status')}" \
                  f"{' (' + fields['Reason'] + ')' if fields.get('Reason', 'None') != 'None' else ''}"

    def cancel(self, record, root, requested=lambda: None):
        if record.get("job_id"):
            run_tool("scancel", record["job_id"])
        else:
            run_tool("scancel", "-n", record["name"])
        requested()
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while record.get("job_id") and time.monotonic() < deadline and self.state(record) not in (None, "CANCELLED"):
            time.sleep(0.2)

    def describe(self, record):
        return f"slurm job {record.get('job_id') or record['name']}"


# ---------------------------------------------------------------------------
# Ray: the Jobs API (the client imports in about 2 s; only the ray backend pays it)


class Ray:
    TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

    def __init__(self, options):
        self.options = options
        self._client = None

    @property
    def client(self):
        if self._client is None:
            try:
                from ray.job_submission import JobSubmissionClient
            except ImportError:
                raise common.Refusal("the ray backend needs Ray: uv sync --group cluster") from None
            for name in [name for name in logging.root.manager.loggerDict if name.startswith("ray")]:
                logging.getLogger(name).setLevel(logging.ERROR)  # packaging chatter would land in run.log
            address = self.options.get("address") or DEFAULT_RAY_ADDRESS
            try:
                self._client = JobSubmissionClient(address)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise common.Refusal(f"no Ray cluster at {address}: {str(error).splitlines()[0]}") from None
        return self._client

    def info(self, record):
        try:
            return self.client.get_job_info(record["name"])
        except RuntimeError:  # the Jobs API answers 404 for a submission id it does not know
            return None

    def submit(self, record, root, command):
        names = [name for name in os.environ if name.startswith("AUTORESEARCH_")] + list(self.options.get("env") or [])
        env_vars = {name: os.environ[name] for name in names if name in os.environ}
        env_vars["PYTHONUNBUFFERED"] = "1"
        self.client.submit_job(
            entrypoint=shlex.join(command), submission_id=record["name"],
            entrypoint_num_gpus=self.options["gpus"],
            runtime_env={"working_dir": str(root), "excludes": RAY_EXCLUDES, "env_vars": env_vars},
            metadata={"worktree": str(root), "commit": record["commit"], "seed": str(record["seed"])})
        return record["name"]

    def find(self, record, root):
        return record["name"] if self.info(record) is not None else None

    def status(self, record):
        info = self.info(record)
        return str(info.status.value if hasattr(info.status, "value") else info.status) if info else None

    def running(self, record, root):
        return self.status(record) not in self.TERMINAL + (None,)

    def started(self, record, root):
        return self.status(record) != "PENDING"

    def read_log(self, record, root, offset):
        try:
            return self.client.get_job_logs(record["name"]).encode("utf-8", errors="replace")[offset:]
        except RuntimeError:
            return b""

    def exit_code(self, record, root):
        info = self.info(record)
        status, code = self.status(record), getattr(info, "driver_exit_code", None)
        if status == "SUCCEEDED":
            return code or 0, None
        if status == "FAILED" and code:
            return code, None
        return code or 1, f"ray job {record['name']} ended {status}: {((info and info.message) or '').strip()[:200]}"

    def cancel(self, record, root, requested=lambda: None):
        try:
            self.client.stop_job(record["name"])
        except RuntimeError:
            return requested()
        requested()
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while time.monotonic() < deadline and self.running(record, root):
            time.sleep(0.2)

    def describe(self, record):
        return f"ray job {record['name']}"


# ---------------------------------------------------------------------------
# One run: find or submit, stream, exit with the job's code


def follow(backend, record, root):
    """Stream the job's log to stdout until it has ended; returns its exit code."""
    offset, started = 0, False
    while True:
        running = backend.running(record, root)
        if not started and backend.started(record, root):
            started = True
            record["started_at"] = common.now_iso()
            save_record(root, record)
        chunk = backend.read_log(record, root, offset)
        if chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            offset += len(chunk)
        if not running:
            break
        check_cancelled()
        time.sleep(POLL_SECONDS)
        check_cancelled()
    chunk = backend.read_log(record, root, offset)  # whatever was written between the last read and the end
    if chunk:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    code, problem = backend.exit_code(record, root)
    if problem:
        say(problem)
    return code


def dispatch(backend_name, options, command, root=common.ROOT):
    """Run `command` as one job of `backend_name`, attached to an earlier submission of the same
    run when there is one; returns the job's exit code."""
    seed = os.environ.get("AUTORESEARCH_SEED", str(common.DEFAULT_SEED))
    commit = common.git("rev-parse", "HEAD")
    key = job_key(root, commit, seed, command, backend_name)
    path = jobs_dir(root) / f"{key}.json"
    record = common.read_json(path)
    backend = {"slurm": Slurm, "ray": Ray}[backend_name](options)
    cancelled = cancel_in_flight(root, keep=key, reason="stale: its experiment was interrupted")
    if cancelled:
        say(f"cancelled {', '.join(cancelled)}, left running by an interrupted experiment")

    try:
        job_id = backend.find(record, root) if record and record["state"] in IN_FLIGHT else None
        if job_id:
            record.update(job_id=job_id, state="submitted", attached_at=common.now_iso())
            save_record(root, record)
            say(f"attached to {backend.describe(record)}, submitted {record['submitted_at']} by an interrupted run")
        else:
            attempt = (record or {}).get("attempt", 0) + (0 if record and record["state"] == "submitting" else 1)
            # A random part too: a worktree made again at the same path must not meet its old job names.
            record = {"key": key, "name": f"autoresearch-{key}-{attempt}-{secrets.token_hex(3)}", "attempt": attempt,
                      "backend": backend_name, "options": options, "commit": commit, "seed": seed,
                      "command": command, "worktree": str(root), "state": "submitting",
                      "submitted_at": common.now_iso()}
            save_record(root, record)  # first: a kill during submission is found again by the job's name
            record.update(job_id=backend.submit(record, root, command), state="submitted")
            save_record(root, record)
            say(f"submitted {backend.describe(record)}")
        check_cancelled()
        code = follow(backend, record, root)
        check_cancelled()  # a signal whose exception was dropped must not pass for a finished job
    except Cancelled as cancelled:
        number = cancelled.args[0]
        if record and record["state"] in IN_FLIGHT:
            def recorded():  # as soon as the cancel is asked for: SIGKILL may follow before the job has stopped
                record.update(state="cancelled", reason=f"signal {number}", finished_at=common.now_iso())
                save_record(root, record)
                say(f"cancelled {backend.describe(record)} (signal {number})")
            backend.cancel(record, root, requested=recorded)
        return 128 + number
    record.update(state="done", exit_code=code, finished_at=common.now_iso())
    save_record(root, record)
    return code


def default_time_limit():
    """Minutes for SLURM's --time: experiment.py's default timeout plus a minute, from the profile
    (an external task's: its own timeout plus a minute)."""
    current = task.load()
    if current is not None:
        return math.ceil(current.timeout / 60) + 1
    manifest = common.load_manifest() or {}
    budget = manifest.get("time_budget")
    if not common.is_finite_number(budget):
        return 60
    return math.ceil((2 * budget + TIME_LIMIT_MARGIN_SECONDS) / 60)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Run one training command as a cluster job: stream its log, "
                                     "exit with its code, cancel it on SIGTERM.",
                                     usage="dispatch.py --backend {slurm,ray} [options] -- COMMAND ...")
    parser.add_argument("--backend", choices=BACKENDS, required=True, help="the engine that runs the job")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per job (default 1)")
    parser.add_argument("--partition", help="slurm: the partition (default: the cluster's default)")
    parser.add_argument("--time-limit", type=int, metavar="MINUTES",
                        help="slurm: --time of the job (default: from the prepared time budget, "
                        f"2 x budget + {TIME_LIMIT_MARGIN_SECONDS} s)")
    parser.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                        help="slurm: an extra sbatch option, e.g. --sbatch-option=--account=lab (repeatable)")
    parser.add_argument("--address", help=f"ray: the Jobs API address (default: $RAY_ADDRESS, else "
                        f"{DEFAULT_RAY_ADDRESS})")
    parser.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="ray: pass this environment variable to the job too (AUTORESEARCH_* always are; "
                        "repeatable)")
    if "--" not in argv:
        if "-h" in argv or "--help" in argv:
            parser.parse_args(["--help"])  # prints the help and exits 0
        raise common.Refusal("give the training command after --, e.g. dispatch.py --backend slurm -- python train.py")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        raise common.Refusal("the training command after -- is empty")
    if args.gpus < 1:
        raise common.Refusal("--gpus must be at least 1")
    if args.backend == "slurm":
        options = {"gpus": args.gpus, "partition": args.partition, "sbatch_options": args.sbatch_option,
                   "time_limit": args.time_limit or default_time_limit()}
    else:
        options = {"gpus": args.gpus, "address": args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_RAY_ADDRESS,
                   "env": args.env}
    return args.backend, options, command


def main():
    backend, options, command = parse_args(sys.argv[1:])
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, raise_cancelled)
    return dispatch(backend, options, command)


if __name__ == "__main__":
    common.run_main(main)
