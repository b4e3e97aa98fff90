"""Start a research session: branch, ledger, memory files, data check, protocol pin.

Creates branch autoresearch/<tag> from the current commit, writes the results.tsv header,
creates notes.md and .claude/context/memory/{learnings,issues,decisions}.md from the tracked
templates when they do not exist yet (never overwriting), checks that prepare.py has run, and
records runs/session.json, whose pins (below) every later experiment and keep checks. The ledger and runs of an
earlier session are moved to runs/archive/<old tag>/ first, so nothing is lost.

Then it measures the noise floor: the starting commit (the baseline's code) trained again under
other seeds, --noise-runs times (default 2; each as long as an experiment, so on the H100 profile
run setup in the background or pass --noise-runs 0 and measure later). The baseline experiment
adds its own run, and noise_bpb in session.json is the standard deviation of val_bpb across
seeds (pooled over commits). `--measure-noise` adds runs of HEAD to an existing session.

The noise runs of the starting commit (the human's code) also measure the compute a run may use.
On the cpu profiles, whose budget is training tokens, every later run may use runner.TOKEN_CEILING
times the most a baseline run used; on a time budget, the budget plus a bounded allowance for
start-up, evaluation and export (runner.allowance_from). Past that a run is stopped and `invalid`.

It also checks once whether training can run in the sandbox (bubblewrap: see experiment.py) and
says so when it cannot; --no-sandbox turns it off, --no-referee turns off the referee (train.py
then scores itself, sees the evaluation data, and its results are self-reported, never verified).
Both are recorded, and neither may replace a session that had them on unless --new-session says
so. The pins: prepare.py, scripts/*.py, .claude/hooks/*, .claude/settings.json, and every file
of the prepared data (sha256, size, mtime_ns and inode).

With an autoresearch.toml at the root (scripts/task.py) the session researches that external task
instead: no prepare.py or prepared data is needed, the ledger gets the task's metric and columns,
the task file is pinned by its sha256, and the referee is off: the task's script scores itself,
so every result is self-reported. The noise runs run the task's command.

Usage:
    uv run scripts/setup.py [--tag TAG] [--deadline HOURS|ISO-TIME] [--max-experiments N]
                            [--noise-runs N] [--gpus N] [--no-sandbox] [--no-referee] [--new-session]
    uv run scripts/setup.py --measure-noise [--noise-runs N]
"""

import argparse
import datetime
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import runner  # noqa: E402
import task  # noqa: E402
import tracking  # noqa: E402

MEMORY_FILES = {  # template name -> where setup puts it
    "notes.md": common.NOTES_FILE,
    "learnings.md": common.MEMORY_DIR / "learnings.md",
    "issues.md": common.MEMORY_DIR / "issues.md",
    "decisions.md": common.MEMORY_DIR / "decisions.md",
}


def default_tag():
    """Today's date the way upstream names sessions: nov23, mar5."""
    today = datetime.date.today()
    return f"{today.strftime('%b').lower()}{today.day}"


def parse_deadline(text):
    """A number of hours from now, or an ISO time; returned as ISO-8601 UTC."""
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        moment = now + datetime.timedelta(hours=float(text))
    except ValueError:
        try:
            moment = common.parse_iso(text)
        except ValueError:
            raise common.Refusal(f"--deadline {text!r} is neither hours (8) nor an ISO time "
                                 "(2026-11-24T07:00)") from None
    if moment <= now:
        raise common.Refusal(f"--deadline {text!r} is already past")
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")


def archive_previous_session():
    """Move an earlier session's ledger, session file and runs to runs/archive/<tag>/."""
    session = common.load_session() or {}
    run_dirs = sorted(common.RUNS_DIR.glob("[0-9][0-9][0-9][0-9]-*"))
    leftovers = [p for p in (common.LEDGER_FILE, common.SESSION_FILE, common.PROGRESS_PLOT, common.HELDOUT_FILE)
                 if p.exists()]
    if not (leftovers or run_dirs):
        return None
    name = session.get("tag") or "untagged"
    target, suffix = common.ARCHIVE_DIR / name, 1
    while target.exists():
        suffix += 1
        target = common.ARCHIVE_DIR / f"{name}-{suffix}"
    target.mkdir(parents=True)
    for path in leftovers + run_dirs:
        shutil.move(str(path), str(target / path.name))
    if common.RUN_LOG.is_symlink():
        common.RUN_LOG.unlink()
    return target


def create_memory_files():
    """Copy each memory template into place unless the file already exists."""
    created = []
    for template, target in MEMORY_FILES.items():
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        source = common.TEMPLATES_DIR / template
        if source.exists():
            shutil.copyfile(source, target)
        else:  # templates not installed: an empty file with a heading still gives the agent a place
            target.write_text(f"# {template[:-3].capitalize()}\n")
        created.append(target)
    return created


NOISE_SEED_START = common.DEFAULT_SEED + 1  # the baseline runs under train.py's default seed


def measure_noise(session, commit, count, command=None, timeout=None):
    """Train `commit` (it must be HEAD) `count` times under seeds not yet used for it, each in its own
    runs/ folder (kind "noise"; the referee scores its model, which is then deleted), adding each
    result to the session's noise samples and, for the starting commit (the human's code), its
    compute, which sets the limit of every later run (runner.record_baseline).
    Returns (the number of runs that finished, a line about the first that did not, or None)."""
    current = task.session_task(session)  # an external task: its command, its timeout
    ranks = 1
    if current:
        timeout, command = timeout or current.timeout, command or list(current.command)
    else:
        manifest = common.require_manifest()
        timeout = timeout or runner.default_timeout(manifest)
        if command is None and not os.environ.get("AUTORESEARCH_TRAIN_COMMAND"):
            ranks = common.session_gpus(session, manifest)  # golf's 8 GPUs: the noise is the experiments' own
        command = command or common.training_command(gpus=ranks)
    finished, problem = 0, None
    for _ in range(count):
        used = {sample["seed"] for sample in session.get("noise_runs") or [] if sample["commit"] == commit}
        seed = runner.next_seed(used, NOISE_SEED_START)
        run_dir = runner.new_run_dir(commit)
        started_at = common.now_iso()
        run = runner.train_run(run_dir, command, seed, timeout, session, task=current, ranks=ranks)
        runner.score_run(run, run_dir, session, timeout)
        runner.delete_saved_models([run_dir])
        common.write_json_atomic(run_dir / "summary.json", {
            "id": run_dir.name[:4], "kind": "noise", "description": f"noise run of {commit[:7]} (seed {seed})",
            "commit": commit, "seed": seed, "status": run["status"],
            "val_bpb": run["value"] if run["status"] == "ok" else None, "claimed": run["val_bpb"],
            "referee": run["referee"], "self_reported": run["self_reported"], "metrics": run["metrics"],
            "triage": run["failure"], "exit_code": run["exit_code"], "sandbox": run["sandbox"],
            "protections": run["protections"], "started_at": started_at, "finished_at": common.now_iso(),
            "wall_seconds": run["wall_seconds"], "cpu_seconds": run["cpu_seconds"],
            "compute_seconds": run["compute_seconds"], "clock": run["clock"], "run_log": run["run_log"]})
        tracking.submit(run_dir, tracking.check(session))
        if run["status"] != "ok":
            problem = f"noise run {run_dir.name} {run['status']} ({run['failure']['kind']}: {run['failure']['detail']})"
            break
        runner.record_noise_sample(session, run_dir.name, commit, seed, run["value"])
        if commit == session["start_commit"]:
            runner.record_baseline(session, run)
        common.write_json_atomic(common.SESSION_FILE, session)  # after each run: a kill keeps what was measured
        finished += 1
    return finished, problem


def measure_noise_again(count):
    """`--measure-noise`: more noise runs of HEAD in the current session."""
    session = common.require_session()
    if common.current_branch() != session["branch"]:
        raise common.Refusal(f"on {common.current_branch() or 'a detached HEAD'}, but the session is "
                             f"{session['branch']}: git checkout {session['branch']}")
    pending = common.load_pending()
    if pending:
        raise common.Refusal(common.pending_message(pending) + " before measuring the noise")
    changed = common.changed_tracked_files()
    if changed:
        raise common.Refusal(f"uncommitted changes to tracked files ({', '.join(changed)}): the noise runs "
                             "train HEAD as committed; commit or revert them first")
    runner.check_pins(session, data=True)
    before = common.noise_band(session)
    finished, problem = measure_noise(session, common.head_commit(), count)
    print(f"noise {common.noise_summary(session)} after {finished} more run{'s' * (finished != 1)} of "
          f"{common.head_commit()[:7]} (was {before:.6f})" + (f"; {problem}" if problem else ""))
    return 1 if problem else 0


def refuse_silent_downgrade(args):
    """--no-sandbox or --no-referee in place of a session that had them on would quietly lower the
    protection of everything that follows: refused unless --new-session says it is meant."""
    previous = common.load_session()
    if not previous or args.new_session:
        return
    lowered = [flag for flag, used, key in (("--no-sandbox", args.no_sandbox, "sandbox"),
                                             ("--no-referee", args.no_referee, "referee"))
               if used and previous.get(key) != "off"]
    if lowered:
        raise common.Refusal(f"session {previous.get('tag')} runs with the {' and '.join(f[5:] for f in lowered)} on: "
                             f"{' '.join(lowered)} would replace it with a less protected one; a human who means "
                             "it adds --new-session")


def main():
    parser = argparse.ArgumentParser(description="Start a research session on branch autoresearch/<tag>, "
                                     "and measure the noise floor.")
    parser.add_argument("--tag", default=default_tag(),
                        help="session name; the branch is autoresearch/<tag> (default: today, e.g. nov23)")
    parser.add_argument("--deadline", help="stop after this many hours, or at this ISO time "
                        "(recorded for the Stop hook and the loop)")
    parser.add_argument("--max-experiments", type=int, metavar="N",
                        help="stop after N experiments (recorded for the Stop hook and the loop)")
    parser.add_argument("--noise-runs", type=int, metavar="N", default=2,
                        help="re-run the starting commit N times under other seeds to measure the noise "
                        "(default 2; 0 skips it and the default noise applies until --measure-noise)")
    parser.add_argument("--gpus", type=int, metavar="N",
                        help="GPUs per training run for the whole session, noise runs included (default: the "
                        "profile's, 8 for golf, else 1); N > 1 trains under torchrun")
    parser.add_argument("--measure-noise", action="store_true",
                        help="in the current session, re-run HEAD --noise-runs more times and update the noise")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="train without the sandbox: the run sees the network, the evaluation data, the whole "
                        "machine, and nothing ends its daemons (results are never verified)")
    parser.add_argument("--no-referee", action="store_true",
                        help="no referee: train.py scores itself, with the evaluation data visible to it, and "
                        "results are self-reported, never verified")
    parser.add_argument("--golf", action="store_true",
                        help="parameter golf on this train.py: the referee scores the model after an int8+zlib "
                        "round trip, and a keep needs the artifact (train.py's bytes plus the compressed model) "
                        f"under {runner.GOLF_LIMIT_BYTES:,} bytes")
    parser.add_argument("--track", choices=("mlflow", "wandb", "none"),
                        help="record every experiment in MLflow or W&B (scripts/tracking.py; default: "
                        "$AUTORESEARCH_TRACK, else none)")
    parser.add_argument("--new-session", action="store_true",
                        help="with --no-sandbox or --no-referee: replace a session that had them on (archived)")
    args = parser.parse_args()
    current = task.load()  # a bad autoresearch.toml is refused before anything changes
    if current and args.golf:
        raise common.Refusal(f"--golf plays parameter golf on this train.py; {common.TASK_FILE.name} describes another "
                             "task (tasks/parameter-golf.toml for the challenge's own repository)")
    if args.noise_runs < 0:
        raise common.Refusal("--noise-runs must be 0 or more")
    if args.gpus is not None and args.gpus < 1:
        raise common.Refusal("--gpus must be at least 1")
    if args.gpus is not None and current:
        raise common.Refusal(f"--gpus runs train.py under torchrun; {common.TASK_FILE.name}'s command launches its "
                             "own processes (put torchrun --nproc_per_node=N in it)")
    if args.golf and args.no_referee:
        raise common.Refusal("--golf is scored by the referee (the int8+zlib round trip of the saved model): "
                             "it cannot run with --no-referee")
    if args.measure_noise:
        if args.no_sandbox or args.no_referee or args.new_session or args.golf or args.gpus is not None:
            raise common.Refusal("--measure-noise runs under the session's own protections, task and GPUs: it takes "
                                 "no --no-sandbox, --no-referee, --new-session, --golf or --gpus")
        if args.noise_runs < 1:
            raise common.Refusal("--measure-noise needs --noise-runs 1 or more")
        return measure_noise_again(args.noise_runs)

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.tag) or ".." in args.tag:
        raise common.Refusal(f"--tag {args.tag!r}: use letters, digits, '.', '_' or '-'")
    if args.max_experiments is not None and args.max_experiments < 1:
        raise common.Refusal("--max-experiments must be at least 1")
    deadline = parse_deadline(args.deadline) if args.deadline else None
    branch = common.BRANCH_PREFIX + args.tag
    if common.git("rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False):
        raise common.Refusal(f"branch {branch} already exists: choose another --tag")
    changed = common.changed_tracked_files()
    if changed:
        raise common.Refusal(f"uncommitted changes to tracked files ({', '.join(changed)}): "
                             "commit or revert them before starting a session")
    if current:
        untracked = [name for name in current.editable if not common.git("ls-files", "--", name)]
        if untracked:
            raise common.Refusal(f"{', '.join(untracked)} (editable in {common.TASK_FILE.name}) is not a tracked file: "
                                 "git add and commit it first")
    elif not common.PREPARE_FILE.exists():
        raise common.Refusal(f"{common.PREPARE_FILE.name} is missing: the session pins its hash")
    pending = common.load_pending()
    if pending:
        raise common.Refusal(common.pending_message(pending) + " before starting a new session")
    manifest = {} if current else common.require_manifest()
    refuse_silent_downgrade(args)

    track = tracking.choose(args.track)  # refused here, before anything changes
    archived = archive_previous_session()
    start_commit = common.head_commit()
    common.git("checkout", "-q", "-b", branch)
    columns = current.ledger_columns() if current else (
        common.GOLF_LEDGER_COLUMNS if args.golf else common.LEDGER_COLUMNS)
    common.ensure_ledger(columns=columns)
    create_memory_files()
    sandbox = "off" if args.no_sandbox else runner.sandbox_state({})
    session = {
        "tag": args.tag,
        "branch": branch,
        "start_commit": start_commit,
        "prepare_sha256": None if current else common.sha256_file(common.PREPARE_FILE),
        "helper_sha256": runner.helper_hashes(),
        "protocol_sha256": runner.protocol_hashes(),  # .claude/settings.json and .claude/hooks/*
        "data_pins": runner.data_pins(),  # every prepared file: sha256, size, mtime_ns, inode
        "profile": manifest.get("profile"),
        "dataset": manifest.get("dataset"),
        "time_budget": manifest.get("time_budget"),
        "train_tokens": manifest.get("train_tokens"),  # the budget on the cpu profiles; None: time_budget
        "started_at": common.now_iso(),
        "deadline": deadline,
        "max_experiments": args.max_experiments,
        "sandbox": sandbox.split(":")[0],  # on, off or unavailable
        "sandbox_problem": sandbox[len("unavailable: "):] if sandbox.startswith("unavailable") else None,
        "referee": "off" if args.no_referee else "on",
        "task": "golf" if args.golf else "builtin",
        "lowered": [flag for flag, used in (("--no-sandbox", args.no_sandbox), ("--no-referee", args.no_referee))
                    if used],
        "allowance_s": None,  # time budget: compute beyond the budget a run may use; measured on the noise runs
        "overheads_s": [],
        "baseline_compute_s": [],  # token budget: what the baseline's runs used; sets the ceiling
        "noise_bpb": None,
        "noise_runs": [],
        "track": track,  # mlflow, wandb or None
        "gpus": args.gpus,  # GPUs per run of train.py when given; None: the profile's (common.session_gpus)
    }
    if current:  # an external task: its file is the protocol, its script the only judge
        session.update(data_pins={}, profile=None, dataset=None, referee="off",
                       time_budget=current.time_budget, train_tokens=None, task="external", task_name=current.name,
                       task_sha256=current.sha256, ledger_columns=list(columns),
                       metric={"name": current.metric_name, "direction": current.direction})
    common.write_json_atomic(common.SESSION_FILE, session)  # its existence means setup completed
    moved = f"; earlier session moved to {archived.relative_to(common.ROOT)}" if archived else ""
    golf = f"; parameter golf: artifacts under {runner.GOLF_LIMIT_BYTES:,} bytes" if args.golf else ""
    if current:
        print(f"session {args.tag}: branch {branch} at {start_commit[:7]}, task {current.name} "
              f"({common.TASK_FILE.name}: {current.metric_name}, {current.direction} is better, self-reported: "
              f"no referee), budget {current.time_budget:g} s{moved}; next: uv run scripts/experiment.py \"baseline\"")
    else:
        print(f"session {args.tag}: branch {branch} at {start_commit[:7]}, profile {session['profile']}{golf}, "
              f"dataset {session['dataset']}, budget {common.budget_text(session)}{moved}; "
              'next: uv run scripts/experiment.py "baseline"')
    if session["sandbox_problem"]:  # said once, here; experiments then run without it
        print(f"sandbox unavailable ({session['sandbox_problem']}): training will run with network access, "
              "a writable repository and the evaluation data in reach; results will not be verified")
    if args.noise_runs:
        finished, problem = measure_noise(session, start_commit, args.noise_runs)
        if problem:
            print(f"{problem}; the noise is not measured (default {common.DEFAULT_NOISE_BPB:g} applies); "
                  "fix it, then uv run scripts/setup.py --measure-noise")
            return 1
        print(f"noise {common.noise_summary(session)}; the baseline adds a run")
    return 0


if __name__ == "__main__":
    common.run_main(main)
