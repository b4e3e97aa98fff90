"""Run one experiment: commit train.py, train with a hard timeout, referee the result, print one line.

Refuses (exit 2, one line) off the session's autoresearch/* branch, when tracked files other than
train.py differ from HEAD, when prepare.py, a helper, a hook, .claude/settings.json or the prepared
data no longer match their pins from setup, and while an earlier experiment awaits its decision.
Otherwise commits train.py when it changed (`experiment: DESCRIPTION`; unchanged means a re-run of
HEAD) and trains it in the sandbox where Linux allows it (bubblewrap: no network, a PID namespace
that ends every process of the run with it, a private HOME and /tmp, the repository, Python and
the train data read-only, the evaluation data hidden, and only runs/<NNNN>-<commit7>/out/ writable),
with all output in runs/<NNNN>-<commit7>/run.log (run.log at the root links to the latest). The
helper measures the run's compute itself (on the cpu profile the CPU time of its whole process
tree, else wall time) and stops it past the limit setup measured on the baseline: `invalid`.

Then the referee scores the model the run saved (out/model.pt2): a copy of the pinned prepare.py,
run with `python -I` in an empty folder, in the sandbox with everything read-only. Its number is
the result (appended to run.log as `val_bpb:`); a model it refuses or that looks ahead, or a
number printed by train.py that disagrees with it by more than runner.REFEREE_TOLERANCE_BPB,
makes the experiment `invalid`. With setup's --no-referee the number is train.py's own, labelled
self-reported, and never verified. summary.json records the protections and whether the result
is `verified`; the result line names any protection that was off.

The verdict compares the result with the best kept, in units of the session's noise (the spread
of val_bpb across seeds, measured by setup.py): `improved` when one run beats the best by
common.KEEP_MARGIN_NOISE noise units, `marginal` when it beats it by less, `rerun`/`cosmetic`
when the diff changes nothing that trains (never kept). A marginal win is confirmed with
`--confirm`: the same commit re-run under a new seed (its own runs/ folder, linked both ways),
judged on the mean of the two runs.

Nothing training prints reaches the console: one line for a result (exit 0), at most three for a
crash or an invalid result (exit 1), never more than 300 bytes. The line ends with the next
command to run, which pending.json also carries as `next`.

Usage:
    uv run scripts/experiment.py "DESCRIPTION" [--timeout SECONDS] [--seed N] [--train-command CMD] [--gpus N]
    uv run scripts/experiment.py --confirm [--timeout SECONDS] [--train-command CMD] [--gpus N]

The training command defaults to this Python running train.py (with --gpus N > 1: under torchrun,
one DistributedDataParallel rank per GPU); --train-command or the AUTORESEARCH_TRAIN_COMMAND
environment variable replaces it (split like a shell would).

In a session of an external task (autoresearch.toml, scripts/task.py) it commits the task's editable
files instead of train.py, runs the task's command (--train-command still replaces it; the
environment variable does not) under the same sandbox, process group, timeout and wall-clock
budget, and reads the metric and the constraints from the run's log with the task's patterns.
There is no referee: the number is the script's own, and the line says self-reported. A run that
breaks a constraint is `constraint`: it keeps its number but is never kept.
"""

import argparse
import glob
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import runner  # noqa: E402
import task  # noqa: E402
import tracking  # noqa: E402  (MLflow or W&B when the session tracks; costs nothing otherwise)

CONSOLE_LIMIT_BYTES = 300  # an agent's context is the scarcest resource of the night
CRASH_EXIT_CODE = 1


def check_preconditions(session, confirming=False):
    """Refuse unless the branch, the working tree, the pins and the data are as the session expects.
    Returns (tracked files that changed, manifest)."""
    branch = common.current_branch()
    if not branch or not branch.startswith(common.BRANCH_PREFIX):
        raise common.Refusal(f"not on an autoresearch/* branch (on {branch or 'a detached HEAD'}): "
                             f"git checkout {session['branch']}")
    if branch != session["branch"]:
        raise common.Refusal(f"on {branch}, but the session is {session['branch']}: "
                             f"git checkout {session['branch']}, or start a new session with setup.py")
    pending = common.load_pending()
    if pending and not confirming:
        raise common.Refusal(common.pending_message(pending))
    changed = common.changed_tracked_files()
    current = task.session_task(session)  # an external task: refused when autoresearch.toml changed
    editable = current.editable if current else ("train.py",)
    others = [path for path in changed if path not in editable or confirming]
    if others:
        raise common.Refusal(f"only {', '.join(editable)} may change, but these differ from HEAD: {', '.join(others)} "
                             f"(revert: git checkout HEAD -- {' '.join(others)})")
    runner.check_pins(session, data=True)  # the data by size, time and inode where large
    if current:
        return changed, {}
    manifest = common.require_manifest()
    for key in ("profile", "dataset"):
        if manifest.get(key) != session.get(key):
            raise common.Refusal(f"the prepared data's {key} is {manifest.get(key)}, but the session "
                                 f"started with {session.get(key)}: results would not compare")
    return changed, manifest


def train_py_line_counts(diff, files=("train.py",)):
    """(lines now, lines in the parent) of train.py (or an external task's editable files), from the
    files and the diff against the parent."""
    lines = sum(len((common.ROOT / name).read_text(errors="replace").splitlines())
                for name in files if (common.ROOT / name).is_file())
    added = sum(1 for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in diff.splitlines() if line.startswith("-") and not line.startswith("---"))
    return lines, lines - added + removed


def link_run_log(run_log):
    """Point the root run.log at this run's log (a relative symlink; False when links fail)."""
    temporary = common.RUN_LOG.with_name(".run.log.tmp")
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_log.relative_to(common.ROOT))
        os.replace(temporary, common.RUN_LOG)
        return True
    except OSError:
        return False


def ascii_line(text, limit):
    """One printable ASCII line of at most `limit` bytes (training output can hold anything)."""
    text = "".join(c if " " <= c <= "~" else "?" for c in " ".join(str(text).split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def installed_version(*names):
    """The version of the first installed package among `names`, from its dist-info folder name:
    a directory listing, where importing torch costs seconds and importlib.metadata 50 ms."""
    for name in names:
        pattern = name.replace("-", "_") + "-*.dist-info"
        for folder in sys.path:
            found = glob.glob(os.path.join(folder or ".", pattern))
            if found:
                return os.path.basename(found[0])[len(name) + 1:-len(".dist-info")]
    return None


def cuda_version(torch):
    """CUDA from torch's local version label (2.9.0+cu128) or the CUDA runtime wheel torch pulled in."""
    if torch and "+cu" in torch:
        return torch.split("+cu", 1)[1]
    return installed_version("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12")


# ---------------------------------------------------------------------------
# Judging: the samples (runs) of an experiment, their mean against the best, and the referee


def sample_of(run_dir, seed, run):
    """One run of an experiment: val_bpb is the number that counts (the referee's, see runner.score_run),
    claimed what train.py printed (None under the sandbox, which hides the evaluation data)."""
    return {"run": run_dir.name, "seed": seed, "val_bpb": run["value"], "claimed": run["val_bpb"],
            "referee": run["referee"], "compute_seconds": run["compute_seconds"]}


def sample_value(sample):
    """The number that counts for one run: the referee's when it verified it, else train.py's."""
    referee = sample.get("referee") or {}
    return referee["bpb"] if referee.get("status") == "verified" else sample["val_bpb"]


def referee_status(samples, session):
    """verified, unverified (a run the referee could not score), invalid, or off (--no-referee)."""
    if session.get("referee") == "off":
        return "off"
    statuses = [sample["referee"]["status"] for sample in samples if sample.get("referee")]
    return next((status for status in ("invalid", "unverified") if status in statuses), "verified")


def record_protections(summary, samples, guards):
    """summary.json's protections, referee and verified: verified only when the referee scored every run
    and nothing was lowered."""
    summary["protections"] = guards
    summary["verified"] = summary["referee"] == "verified" and all(
        runner.is_verified(guards, (sample.get("referee") or {}).get("status"))
        for sample in samples if not sample.get("noise"))


TOO_BIG = "too big"  # golf: the artifact is over the limit (or was not measured); never kept


def judge(summary, samples, rows, session):
    """Fill summary's judged fields from its samples: val_bpb (their mean), runs, delta, verdict."""
    best = common.best_kept(rows)
    best_val = best.val_bpb if best else None
    noise = common.noise_band(session)
    value = statistics.fmean(sample_value(sample) for sample in samples)
    summary.update(
        samples=samples, runs=len(samples), val_bpb=value, noise_bpb=noise,
        best_before={"commit": best.commit, "val_bpb": best.val_bpb} if best else None,
        delta_vs_best=value - best_val if best else None,
        delta_noise_units=round(common.noise_units(value - best_val, noise), 2) if best else None,
        verdict=common.verdict(value, best_val, noise, summary["train_py_lines"], summary["parent_train_py_lines"],
                               runs=len(samples), change=summary["change"],
                               direction=common.metric_direction(session)))
    if runner.golf_session(session):  # the largest artifact of its runs, against the challenge's limit
        sizes = [(sample.get("referee") or {}).get("artifact_bytes") for sample in samples]
        sizes = [size for size in sizes if isinstance(size, int)]
        summary.update(artifact_bytes=max(sizes) if sizes else None, artifact_limit_bytes=runner.GOLF_LIMIT_BYTES)
        if not sizes or max(sizes) > runner.GOLF_LIMIT_BYTES:
            summary["verdict"] = TOO_BIG


def next_step(summary):
    """The command to run next, for the console line, pending.json and the loop."""
    if summary["status"] != "ok":
        return common.DISCARD_COMMAND
    if summary["verdict"] == "marginal" and not summary.get("confirmations"):
        return common.CONFIRM_COMMAND
    if summary["verdict"] in common.KEEP_VERDICTS and summary.get("referee") in ("verified", "off"):
        return common.KEEP_COMMAND
    return common.DISCARD_COMMAND


def console_lines(summary):
    """What the agent sees: one line for a result, at most three for a crash, within 300 bytes."""
    number, commit = summary["id"], summary["commit"][:7]
    failure = summary["triage"]
    metric = summary.get("metric_name") or "val_bpb"
    if summary["status"] == common.CONSTRAINT_STATUS:  # measured, but against the task's rules
        return [ascii_line(f"{number} {commit} constraint: {failure['detail']}; {metric} {summary['val_bpb']:.6f} "
                           "self-reported, never kept (next: decide.py discard)", CONSOLE_LIMIT_BYTES - 1)]
    if failure:
        kind = "invalid" if summary["status"] == "invalid" else "crash"
        lines = [ascii_line(f"{number} {commit} {kind} ({failure['kind']}): {failure['detail']}", 160)]
        lines += [ascii_line(line, 75) for line in failure["excerpt"][:1]]
        return lines + [ascii_line(f"log {summary['run_log']}; next: decide.py discard", 60)]
    seconds = summary.get("compute_seconds")
    seconds = seconds if common.is_finite_number(seconds) else summary["wall_seconds"]
    clock = "cpu" if summary.get("clock") == "cpu_time" else "wall"
    best = summary["best_before"]
    runs = f" mean of {summary['runs']} runs" if summary["runs"] > 1 else ""
    if best:
        against = (f"{summary['delta_vs_best']:+.6f} vs best {best['val_bpb']:.6f}, "
                   f"{summary['delta_noise_units']:+.1f} noise")
    else:
        # A baseline of several runs is one with setup's noise runs: the noise now counts this run too,
        # and may differ much from what setup printed (seen: 0.001232 from two seeds, 0.019704 from three).
        remeasured = ", re-measured with this run" if summary["runs"] > 1 else ""
        against = f"baseline; noise {summary['noise_bpb']:.6f}{remeasured}"
    unverified = ""
    if summary.get("referee") == "unverified":
        detail = next(s["referee"]["detail"] for s in summary["samples"] if (s.get("referee") or {}).get("status") == "unverified")
        unverified = f", unverified: {detail}"
    off = common.protections_off(summary.get("protections") or {})
    lowered = f"; {', '.join(off)}" if off else ""
    step = summary["next"].replace("uv run scripts/", "")
    size = summary.get("artifact_bytes")
    artifact = f" artifact {size / 1e6:.3f} MB" if isinstance(size, int) else ""
    memory = f" mem {summary['memory_gb']:.1f} GB" if summary.get("task") is None else "".join(
        f" {name} {task.format_value(value)}" for name, value in (summary.get("constraints") or {}).items()
        if value is not None)
    line = (f"{number} {commit} {metric} {summary['val_bpb']:.6f}{runs} ({against}){memory}"
            f"{artifact} {clock} {seconds:.1f} s: {summary['verdict']}{unverified}{lowered} (next: {step})")
    return [ascii_line(line, CONSOLE_LIMIT_BYTES - 1)]


def finish(summary, pending, run_dir):
    """Write the summary and the pending state, print the console line, return the exit code."""
    summary["next"] = next_step(summary)
    summary["tracking"] = tracking.check()  # a tracker that is down: one warning line, a note here
    common.write_json_atomic(run_dir / "summary.json", summary)
    tracking.submit(run_dir, summary["tracking"])  # queued for a detached worker: never waits
    pending.update(state="finished", status=summary["status"], verdict=summary["verdict"],
                   val_bpb=summary["val_bpb"] if summary["status"] in ("ok", common.CONSTRAINT_STATUS) else None,
                   memory_gb=summary["memory_gb"], artifact_bytes=summary.get("artifact_bytes"),
                   columns=summary.get("columns"),
                   triage=summary["triage"] and summary["triage"]["kind"],
                   referee=summary.get("referee"), next=summary["next"])
    common.write_json_atomic(common.PENDING_FILE, pending)
    print("\n".join(console_lines(summary)))
    return 0 if summary["status"] == "ok" else CRASH_EXIT_CODE


# ---------------------------------------------------------------------------
# An experiment, and the confirmation of a marginal one


def run_experiment(args):
    description = " ".join((args.description or "").split())
    if not description:
        raise common.Refusal("give the experiment a description: what does it try?")
    session = common.require_session()
    changed, manifest = check_preconditions(session)
    current = task.session_task(session)
    args.gpus = gpus_of(args, session, manifest, current)
    rows = common.read_ledger()  # a corrupt ledger is refused now, not after an hour of training
    timeout = args.timeout or (current.timeout if current else runner.default_timeout(manifest))
    seed = args.seed if args.seed is not None else int(os.environ.get("AUTORESEARCH_SEED", common.DEFAULT_SEED))
    command = experiment_command(args, current)
    editable = current.editable if current else ("train.py",)
    parent = common.head_commit()
    number = f"{runner.next_run_number():04d}"
    pending = {"id": number, "state": "starting", "description": description, "parent": parent,
               "started_at": common.now_iso(), **common.process_marker()}
    if runner.golf_session(session):  # golf's ledger keeps the hypothesis the agent wrote for this run
        pending["reasoning"] = common.newest_hypothesis()
    common.write_json_atomic(common.PENDING_FILE, pending)  # before the commit: a kill from here on is noticed

    edited = [name for name in editable if name in changed]
    rerun = not edited
    try:
        commit = parent if rerun else common.commit_files(edited, f"experiment: {description}")
    except common.GitError:
        common.PENDING_FILE.unlink()  # nothing was committed: nothing is pending
        raise
    run_dir = runner.new_run_dir(commit)
    run_log = run_dir / "run.log"
    pending.update(state="running", commit=commit, run_dir=str(run_dir.relative_to(common.ROOT)))
    common.write_json_atomic(common.PENDING_FILE, pending)
    diff = "" if rerun else common.git("diff", parent, commit, "--", *editable)
    lines, parent_lines = train_py_line_counts(diff, editable)
    started_at = common.now_iso()
    linked = link_run_log(run_log)

    def record_training_pid(pid):  # so that decide.py can stop training orphaned by a killed experiment.py
        pending["training_pgid"] = pid
        common.write_json_atomic(common.PENDING_FILE, pending)

    run = runner.train_run(run_dir, command, seed, timeout, session, on_start=record_training_pid,
                           ranks=args.gpus, task=current)
    runner.score_run(run, run_dir, session, timeout)  # every run is scored by the referee: its number decides
    if not linked:
        common.RUN_LOG.write_bytes(run_log.read_bytes())
    peak_vram_mb = run["metrics"].get("peak_vram_mb")
    memory_gb = peak_vram_mb / 1024 if run["status"] == "ok" and common.is_finite_number(peak_vram_mb) else 0.0
    torch = installed_version("torch")
    summary = {
        "id": number, "kind": "experiment", "description": description, "status": run["status"],
        "verdict": run["status"] if run["status"] != "ok" else None, "val_bpb": None,
        "memory_gb": round(memory_gb, 3), "metrics": run["metrics"], "triage": run["failure"],
        "best_before": None, "delta_vs_best": None, "noise_bpb": common.noise_band(session),
        "commit": commit, "parent": parent, "rerun": rerun, "branch": session["branch"],
        "diff": diff, "change": common.classify_change(diff), "train_py_lines": lines,
        "parent_train_py_lines": parent_lines, "samples": [], "runs": 0, "confirmations": [], "referee": None,
        "seed": seed, "command": command, "timeout_s": timeout, "exit_code": run["exit_code"],
        "timed_out": run["timed_out"], "sandbox": run["sandbox"], "started_at": started_at,
        "finished_at": common.now_iso(), "wall_seconds": run["wall_seconds"], "cpu_seconds": run["cpu_seconds"],
        "compute_seconds": run["compute_seconds"], "clock": run["clock"], "compute_limit_s": run["compute_limit_s"],
        "protections": run["protections"], "verified": False, "self_reported": run["self_reported"],
        "profile": manifest.get("profile"), "dataset": manifest.get("dataset"), "manifest": manifest,
        "prepare_sha256": session["prepare_sha256"], "session": session["tag"],
        "host": os.uname().nodename, "platform": " ".join(os.uname()[i] for i in (0, 2, 4)),
        "python": platform.python_version(), "torch": torch, "cuda": cuda_version(torch),
        "run_log": run["run_log"],
    }
    if run["referee"]:
        summary["referee_seconds"] = run["referee"]["seconds"]
    if current:  # what the task's patterns read, and the ledger's extra columns
        values = {constraint.name: run["metrics"].get(constraint.name) for constraint in current.constraints}
        summary.update(task=current.name, metric_name=current.metric_name, direction=current.direction,
                       constraints=values, columns=current.column_values(values), editable=list(editable),
                       self_reported=True)
    if run["status"] == "ok":
        # Setup's noise runs re-ran this very commit (the baseline) under other seeds: they count too.
        noise_runs = [{"run": sample["run"], "seed": sample["seed"], "val_bpb": sample["val_bpb"], "noise": True}
                      for sample in session.get("noise_runs") or []
                      if sample["commit"] == commit and sample["seed"] != seed and sample["run"] != run_dir.name]
        judge(summary, [sample_of(run_dir, seed, run)] + noise_runs, rows, session)
        summary["referee"] = referee_status(summary["samples"], session)
        record_protections(summary, summary["samples"], run["protections"])
        changed_session = False
        if noise_runs:  # this run is one more sample of the noise
            changed_session = runner.record_noise_sample(session, run_dir.name, commit, seed, run["value"])
            summary["noise_bpb"] = common.noise_band(session)
        if commit == session["start_commit"]:  # the human's code: its overhead sets the compute allowance
            runner.record_baseline(session, run)
            changed_session = True
        if changed_session:
            common.write_json_atomic(common.SESSION_FILE, session)
    else:
        summary["protections"] = run["protections"]
        if run["status"] == "invalid":
            summary["verdict"] = "invalid"
        if run["status"] == common.CONSTRAINT_STATUS:
            summary.update(verdict=common.CONSTRAINT_STATUS, val_bpb=run["value"])
    return finish(summary, pending, run_dir)


def gpus_of(args, session, manifest, current):
    """--gpus, else the session's GPU count (setup.py --gpus, else the profile's: golf 8, the
    challenge's) for train.py's own default command, else 1: a custom command or an external task
    launches its own processes."""
    if args.gpus is not None:
        return args.gpus
    custom = args.train_command or os.environ.get("AUTORESEARCH_TRAIN_COMMAND") or current is not None
    return 1 if custom else common.session_gpus(session, manifest)


def experiment_command(args, current):
    """The command that runs one experiment: --train-command, else an external task's own command,
    else common.training_command (train.py, under torchrun with --gpus N)."""
    if current is None:
        return common.training_command(args.train_command, args.gpus)
    if args.gpus > 1:
        raise common.Refusal(f"--gpus runs train.py under torchrun; {common.TASK_FILE.name}'s command launches its "
                             "own processes (put torchrun --nproc_per_node=N in it)")
    return common.training_command(args.train_command) if args.train_command else list(current.command)


def confirm(args):
    """Re-run the pending marginal experiment's commit under a new seed and judge it on the mean."""
    if args.description or args.seed is not None:
        raise common.Refusal("--confirm takes no description or --seed: it re-runs the pending experiment "
                             "under the next unused seed")
    session = common.require_session()
    pending = common.load_pending()
    if pending is None:
        raise common.Refusal("nothing to confirm: no experiment is pending")
    state = common.pending_state(pending)
    if state != "finished":
        raise common.Refusal(common.pending_message(pending))
    _changed, manifest = check_preconditions(session, confirming=True)
    path = common.ROOT / pending["run_dir"] / "summary.json"
    summary = common.read_json(path)
    if summary is None or summary.get("status") != "ok":
        raise common.Refusal(f"experiment {pending['id']} has no result to confirm: {common.DISCARD_COMMAND}")
    if summary.get("confirmations") and summary["verdict"] != "marginal":
        raise common.Refusal(f"experiment {pending['id']} was already confirmed once ({summary['verdict']}): "
                             f"run {summary['next']}")
    if summary["verdict"] != "marginal":
        raise common.Refusal(f"experiment {pending['id']} is {summary['verdict']}, not marginal: nothing to "
                             f"confirm; run {summary['next']}")
    commit = pending["commit"]
    if common.head_commit() != commit:
        raise common.Refusal(f"HEAD is {common.head_commit()[:7]}, not experiment {pending['id']}'s commit "
                             f"{commit[:7]}: git checkout it, or discard")
    rows = common.read_ledger()
    external = task.session_task(session)
    args.gpus = gpus_of(args, session, manifest, external)
    timeout = args.timeout or (external.timeout if external else runner.default_timeout(manifest))
    seed = runner.next_seed({sample["seed"] for sample in summary["samples"]}, summary["seed"] + 1)
    run_dir = runner.new_run_dir(commit)
    pending["confirmation"] = {"state": "running", "run_dir": str(run_dir.relative_to(common.ROOT)), "seed": seed,
                               "started_at": common.now_iso(), **common.process_marker()}
    common.write_json_atomic(common.PENDING_FILE, pending)
    summary["confirmations"].append(run_dir.name)
    link_run_log(run_dir / "run.log")

    def record_training_pid(pid):
        pending["confirmation"]["training_pgid"] = pid
        common.write_json_atomic(common.PENDING_FILE, pending)

    current = task.session_task(session)
    command = experiment_command(args, current)
    started_at = common.now_iso()
    run = runner.train_run(run_dir, command, seed, timeout, session, on_start=record_training_pid,
                           ranks=args.gpus, task=current)
    runner.score_run(run, run_dir, session, timeout)
    common.write_json_atomic(run_dir / "summary.json", {
        "id": run_dir.name[:4], "kind": "confirmation", "confirms": pending["run_dir"].split("/")[-1],
        "description": f"confirmation of {pending['id']}: {pending['description']}", "commit": commit,
        "seed": seed, "status": run["status"], "val_bpb": run["value"] if run["status"] == "ok" else None,
        "claimed": run["val_bpb"], "referee": run["referee"], "metrics": run["metrics"],
        "triage": run["failure"], "exit_code": run["exit_code"], "timed_out": run["timed_out"],
        "sandbox": run["sandbox"], "protections": run["protections"], "started_at": started_at,
        "finished_at": common.now_iso(), "wall_seconds": run["wall_seconds"], "cpu_seconds": run["cpu_seconds"],
        "compute_seconds": run["compute_seconds"], "clock": run["clock"], "run_log": run["run_log"]})
    tracking.submit(run_dir)  # the confirmation's own tracker run, linked to its experiment's
    pending["confirmation"]["state"] = "finished"
    if run["status"] == "ok":
        judge(summary, summary["samples"] + [sample_of(run_dir, seed, run)], rows, session)
        summary["referee"] = referee_status(summary["samples"], session)
        record_protections(summary, summary["samples"], summary.get("protections") or run["protections"])
    elif run["status"] == "invalid":  # the same code under another seed looked ahead or tampered
        summary.update(status="invalid", verdict="invalid", triage=run["failure"])
    elif run["interrupted"]:
        summary["confirmations"].remove(run_dir.name)  # no evidence either way: --confirm may run again
        pending["confirmation"]["state"] = "interrupted"
    else:
        summary["verdict"] = "not confirmed"
        summary["confirmation_failure"] = run["failure"]
    return finish(summary, pending, common.ROOT / pending["run_dir"])


def main():
    parser = argparse.ArgumentParser(description="Commit train.py, train with a hard timeout, referee the "
                                     "result and print one line; or confirm a marginal one.")
    parser.add_argument("description", nargs="?", help="what this experiment tries (becomes the commit message "
                        "and the ledger's description)")
    parser.add_argument("--confirm", action="store_true",
                        help="re-run the pending marginal experiment under a new seed; it is then judged on "
                        "the mean of its runs")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help=f"kill training after this long (default: 2 x the prepared time budget "
                        f"+ {runner.TIMEOUT_MARGIN_SECONDS} s)")
    parser.add_argument("--seed", type=int, help="AUTORESEARCH_SEED for training (default: the "
                        f"environment's AUTORESEARCH_SEED, else {common.DEFAULT_SEED})")
    parser.add_argument("--train-command", metavar="CMD", help="the training command (default: "
                        "$AUTORESEARCH_TRAIN_COMMAND, else this Python running train.py)")
    parser.add_argument("--gpus", type=int, metavar="N",
                        help="GPUs for this one experiment (default 1, or the profile's: 8 on golf): N > 1 runs "
                        "train.py under torchrun, one rank per GPU (on a cpu profile: N gloo ranks sharing the cores)")
    args = parser.parse_args()
    if args.timeout is not None and args.timeout <= 0:
        raise common.Refusal("--timeout must be positive")
    if args.gpus is not None and args.gpus < 1:
        raise common.Refusal("--gpus must be at least 1")
    if (args.gpus or 1) > 1 and (args.train_command or os.environ.get("AUTORESEARCH_TRAIN_COMMAND")):
        raise common.Refusal("--gpus runs the default training command under torchrun; a custom training "
                             "command launches its own processes")
    return confirm(args) if args.confirm else run_experiment(args)


if __name__ == "__main__":
    common.run_main(main)
