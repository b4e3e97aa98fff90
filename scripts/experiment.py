"""Run one experiment: commit train.py, train with a hard timeout, record the result, print one line.

Refuses (exit 2, one line) off the session's autoresearch/* branch, when tracked files other than
train.py differ from HEAD, when prepare.py or a helper no longer matches its pin from setup, and
while an earlier experiment awaits its decision. Otherwise commits train.py when it changed
(`experiment: DESCRIPTION`; unchanged means a re-run of HEAD), trains in its own process group
with all output in runs/<NNNN>-<commit7>/run.log (run.log at the root links to the latest), kills
the whole group on timeout, writes runs/<NNNN>-<commit7>/summary.json, and marks the experiment
pending until `decide.py` closes it. Nothing training prints reaches the console: one line for a
finished run (exit 0), at most three for a crash (exit 1), never more than 300 bytes.

Usage:
    uv run scripts/experiment.py "DESCRIPTION" [--timeout SECONDS] [--seed N] [--train-command CMD]

The training command defaults to this Python running train.py; --train-command or the
AUTORESEARCH_TRAIN_COMMAND environment variable replaces it (split like a shell would).
"""

import argparse
import glob
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TIMEOUT_MARGIN_SECONDS = 120  # on top of twice the time budget: start-up, compilation, evaluation
DEFAULT_SEED = 42  # train.py's own default for AUTORESEARCH_SEED
CONSOLE_LIMIT_BYTES = 300  # an agent's context is the scarcest resource of the night
CRASH_EXIT_CODE = 1


class Interrupted(BaseException):
    """experiment.py itself got SIGTERM or SIGHUP (a tool timeout, a closed terminal)."""


def raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def check_preconditions(session):
    """Refuse unless the branch, the working tree, the pins and the data are as the session expects.
    Returns (tracked files that changed, manifest)."""
    branch = common.current_branch()
    if not branch or not branch.startswith("autoresearch/"):
        raise common.Refusal(f"not on an autoresearch/* branch (on {branch or 'a detached HEAD'}): "
                             f"git checkout {session['branch']}")
    if branch != session["branch"]:
        raise common.Refusal(f"on {branch}, but the session is {session['branch']}: "
                             f"git checkout {session['branch']}, or start a new session with setup.py")
    pending = common.load_pending()
    if pending:
        raise common.Refusal(common.pending_message(pending))
    changed = common.changed_tracked_files()
    others = [path for path in changed if path != "train.py"]
    if others:
        raise common.Refusal(f"only train.py may change, but these differ from HEAD: {', '.join(others)} "
                             f"(revert: git checkout HEAD -- {' '.join(others)})")
    if not common.PREPARE_FILE.exists() or common.sha256_file(common.PREPARE_FILE) != session["prepare_sha256"]:
        raise common.Refusal("prepare.py no longer matches the hash pinned at setup: the protocol is fixed; "
                             f"restore it (git checkout {session['start_commit'][:7]} -- prepare.py)")
    for name, digest in session.get("helper_sha256", {}).items():
        path = common.SCRIPTS_DIR / name
        if not path.exists() or common.sha256_file(path) != digest:
            raise common.Refusal(f"scripts/{name} no longer matches the hash pinned at setup: restore it "
                                 f"(git checkout {session['start_commit'][:7]} -- scripts/{name})")
    manifest = common.require_manifest()
    for key in ("profile", "dataset"):
        if manifest.get(key) != session.get(key):
            raise common.Refusal(f"the prepared data's {key} is {manifest.get(key)}, but the session "
                                 f"started with {session.get(key)}: results would not compare")
    return changed, manifest


def training_command(option):
    text = option or os.environ.get("AUTORESEARCH_TRAIN_COMMAND")
    return shlex.split(text) if text else [sys.executable, "train.py"]


def default_timeout(manifest):
    budget = manifest.get("time_budget")
    if not common.is_finite_number(budget):
        raise common.Refusal(f"{common.manifest_path()} has no time_budget: pass --timeout SECONDS")
    return 2 * budget + TIMEOUT_MARGIN_SECONDS


def train_py_line_counts(diff):
    """(lines now, lines in the parent) of train.py, from the file and the diff against the parent."""
    lines = len(common.TRAIN_FILE.read_text().splitlines()) if common.TRAIN_FILE.exists() else 0
    added = sum(1 for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in diff.splitlines() if line.startswith("-") and not line.startswith("---"))
    return lines, lines - added + removed


def link_run_log(run_log):
    """Point the root run.log at this run's log (a relative symlink; a copy is made later if links fail)."""
    temporary = common.RUN_LOG.with_name(".run.log.tmp")
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_log.relative_to(common.ROOT))
        os.replace(temporary, common.RUN_LOG)
        return True
    except OSError:
        return False


def train(command, run_log, seed, timeout, on_start):
    """Run training with output to run_log; on_start(pid) is called once it runs.
    Returns (exit code, timed out, interrupted, seconds)."""
    env = dict(os.environ, AUTORESEARCH_SEED=str(seed), PYTHONUNBUFFERED="1")
    started = time.monotonic()
    timed_out = interrupted = False
    previous = {number: signal.signal(number, raise_interrupted) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with open(run_log, "wb") as log:
            process = subprocess.Popen(command, cwd=common.ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            on_start(process.pid)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        except (Interrupted, KeyboardInterrupt):
            interrupted = True
        finally:
            # Always, even after a clean exit: a dataloader worker or a stray child must not outlive the run.
            if common.process_group_alive(process.pid):
                common.stop_process_group(process.pid, reap=process.poll)
            process.wait()
    except OSError as error:  # the command does not exist or cannot be executed
        run_log.write_text(f"could not start the training command {command}: {error}\n")
        return 127, False, False, time.monotonic() - started
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return process.returncode, timed_out, interrupted, time.monotonic() - started


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


def diagnose(tail, metrics, exit_code, timed_out, interrupted, timeout):
    """Why the run gave no usable val_bpb, as common.triage describes it."""
    if interrupted:
        return {"kind": "interrupted", "detail": "experiment.py was interrupted; training was stopped",
                "excerpt": []}
    if metrics:  # a summary block, but val_bpb is NaN or infinite
        return {"kind": "fast_fail", "detail": f"val_bpb is {metrics['val_bpb']}", "excerpt": []}
    return common.triage(tail, exit_code, timed_out, timeout)


def console_lines(summary):
    """What the agent sees: one line for a finished run, at most three for a crash, within 300 bytes."""
    number, commit = summary["id"], summary["commit"][:7]
    failure = summary["triage"]
    if failure:
        lines = [ascii_line(f"{number} {commit} crash ({failure['kind']}): {failure['detail']}", 140)]
        lines += [ascii_line(line, 75) for line in failure["excerpt"][:1]]
        return lines + [ascii_line(f"log {summary['run_log']}; next: decide.py discard", 80)]
    seconds = summary["metrics"].get("training_seconds")
    seconds = seconds if common.is_finite_number(seconds) else summary["wall_seconds"]
    best = summary["best_before"]
    against = f"{summary['delta_vs_best']:+.6f} vs best {best['val_bpb']:.6f}" if best else "baseline"
    advice = "keep" if summary["verdict"] in ("baseline", "improved", "simpler") else "discard"
    line = (f"{number} {commit} val_bpb {summary['val_bpb']:.6f} ({against}) mem {summary['memory_gb']:.1f} GB "
            f"train {seconds:.1f} s: {summary['verdict']} (decide.py {advice})")
    return [ascii_line(line, CONSOLE_LIMIT_BYTES - 1)]


def main():
    parser = argparse.ArgumentParser(description="Commit train.py, train with a hard timeout, "
                                     "record the result and print one line.")
    parser.add_argument("description", help="what this experiment tries (becomes the commit message "
                        "and the ledger's description)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help=f"kill training after this long (default: 2 x the prepared time budget "
                        f"+ {TIMEOUT_MARGIN_SECONDS} s)")
    parser.add_argument("--seed", type=int, help="AUTORESEARCH_SEED for training (default: the "
                        f"environment's AUTORESEARCH_SEED, else {DEFAULT_SEED})")
    parser.add_argument("--train-command", metavar="CMD", help="the training command (default: "
                        "$AUTORESEARCH_TRAIN_COMMAND, else this Python running train.py)")
    args = parser.parse_args()
    description = " ".join(args.description.split())
    if not description:
        raise common.Refusal("give the experiment a description: what does it try?")
    if args.timeout is not None and args.timeout <= 0:
        raise common.Refusal("--timeout must be positive")

    session = common.require_session()
    changed, manifest = check_preconditions(session)
    rows = common.read_ledger()  # a corrupt ledger is refused now, not after an hour of training
    timeout = args.timeout or default_timeout(manifest)
    seed = args.seed if args.seed is not None else int(os.environ.get("AUTORESEARCH_SEED", DEFAULT_SEED))
    command = training_command(args.train_command)
    number = f"{common.next_run_number():04d}"
    parent = common.head_commit()
    pending = {"id": number, "state": "starting", "description": description, "parent": parent,
               "started_at": common.now_iso(), **common.process_marker()}
    common.write_json_atomic(common.PENDING_FILE, pending)  # before the commit: a kill from here on is noticed

    rerun = "train.py" not in changed
    try:
        commit = parent if rerun else common.commit_file("train.py", f"experiment: {description}")
    except common.GitError:
        common.PENDING_FILE.unlink()  # nothing was committed: nothing is pending
        raise
    run_dir = common.RUNS_DIR / f"{number}-{commit[:7]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_log = run_dir / "run.log"
    pending.update(state="running", commit=commit, run_dir=str(run_dir.relative_to(common.ROOT)))
    common.write_json_atomic(common.PENDING_FILE, pending)
    diff = "" if rerun else common.git("diff", parent, commit, "--", "train.py")
    lines, parent_lines = train_py_line_counts(diff)

    started_at = common.now_iso()
    linked = link_run_log(run_log)

    def record_training_pid(pid):  # so that decide.py can stop training orphaned by a killed experiment.py
        pending["training_pgid"] = pid
        common.write_json_atomic(common.PENDING_FILE, pending)

    exit_code, timed_out, interrupted, wall_seconds = train(command, run_log, seed, timeout, record_training_pid)
    if not linked:
        common.RUN_LOG.write_bytes(run_log.read_bytes())

    tail = common.read_tail(run_log)
    metrics = common.parse_summary(tail) if exit_code == 0 and not timed_out and not interrupted else {}
    val_bpb = metrics.get("val_bpb")
    finished = common.is_finite_number(val_bpb)
    failure = None if finished else diagnose(tail, metrics, exit_code, timed_out, interrupted, timeout)
    peak_vram_mb = metrics.get("peak_vram_mb")
    memory_gb = peak_vram_mb / 1024 if finished and common.is_finite_number(peak_vram_mb) else 0.0
    torch = installed_version("torch")
    best = common.best_kept(rows)
    best_val = best.val_bpb if best else None
    noise = common.noise_band(session)
    judged = common.verdict(val_bpb, best_val, noise, lines, parent_lines) if finished else "crash"

    summary = {
        "id": number, "description": description, "status": "ok" if finished else "crash",
        "verdict": judged, "val_bpb": val_bpb if finished else None, "memory_gb": round(memory_gb, 3),
        "metrics": metrics, "triage": failure,
        "best_before": {"commit": best.commit, "val_bpb": best.val_bpb} if best else None,
        "delta_vs_best": val_bpb - best_val if finished and best else None, "noise_bpb": noise,
        "commit": commit, "parent": parent, "rerun": rerun, "branch": session["branch"],
        "diff": diff, "train_py_lines": lines, "parent_train_py_lines": parent_lines,
        "seed": seed, "command": command, "timeout_s": timeout, "exit_code": exit_code,
        "timed_out": timed_out, "started_at": started_at, "finished_at": common.now_iso(),
        "wall_seconds": round(wall_seconds, 3),
        "profile": manifest.get("profile"), "dataset": manifest.get("dataset"), "manifest": manifest,
        "prepare_sha256": session["prepare_sha256"], "session": session["tag"],
        "host": os.uname().nodename, "platform": " ".join(os.uname()[i] for i in (0, 2, 4)),
        "python": platform.python_version(), "torch": torch, "cuda": cuda_version(torch),
        "run_log": str(run_log.relative_to(common.ROOT)),
    }
    common.write_json_atomic(run_dir / "summary.json", summary)
    pending.update(state="finished", status=summary["status"], verdict=judged, val_bpb=summary["val_bpb"],
                   memory_gb=summary["memory_gb"], triage=failure and failure["kind"])
    common.write_json_atomic(common.PENDING_FILE, pending)

    print("\n".join(console_lines(summary)))
    return 0 if finished else CRASH_EXIT_CODE

if __name__ == "__main__":
    common.run_main(main)
