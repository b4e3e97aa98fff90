"""The headless research loop: set-up, baseline, then one experiment after another, unattended.

After set-up (setup.py, then the noise runs of the baseline's code) and the baseline, each
iteration runs propose -> apply -> validate -> commit -> train -> triage [-> confirm -> triage,
when experiment.py calls the gain marginal] -> record -> decide -> remember -> stop-check, and
every stage is recorded in runs/loop/state.json (written atomically) before it runs, so `resume`
carries on after a crash, a reboot or `kill -9` at any moment: a stage is either redone (it
changes nothing twice) or reconciled with what the helpers recorded (a training run still going
is waited for, an interrupted one is recorded as a crash, a half-made decision is finished).
Ledger rows are written only by decide.py, once each.

Proposals come from the human queue first (next_proposal.json, then proposals/*.json), then
from the proposer: the built-in random search (no LLM, the offline default) or an agent CLI
called once per iteration with a fresh context (claude -p, codex exec, opencode run, or any
command template). On stopping, for whatever reason, it writes REPORT.md and progress.png.

With an autoresearch.toml at the root (an external task, scripts/task.py) the same loop researches
that task: no data is prepared, proposals edit the task's editable files (the random search
perturbs the first one's UPPER_CASE settings), and the report says the results are self-reported.

Everything it writes lies in this worktree (runs/loop/, notes.md, REPORT.md, progress.png, the
branch), so several loops in several git worktrees share only the read-only prepared data.

Usage:
    uv run scripts/loop.py start --dataset builtin --max-experiments 3   # offline quickstart, noise measured
    uv run scripts/loop.py start --agent claude --hours 8 --background
    uv run scripts/loop.py resume [--background] [--max-experiments N ...]
    uv run scripts/loop.py status [--json]
    uv run scripts/loop.py stop
"""

import argparse
import datetime
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import runner  # noqa: E402
import proposers  # noqa: E402
import task  # noqa: E402

# ---------------------------------------------------------------------------
# Paths: all inside this worktree (one loop per worktree; lanes never share a file)

LOOP_DIR = common.RUNS_DIR / "loop"
STATE_FILE = LOOP_DIR / "state.json"
LOCK_FILE = LOOP_DIR / "loop.lock"  # held while a loop runs: a second one here is refused
LOG_FILE = LOOP_DIR / "loop.log"  # the console of a --background loop
PREPARE_LOG = LOOP_DIR / "prepare.log"
CONSUMED_DIR = LOOP_DIR / "proposals"  # queue files, archived as <iteration>-<name> once used
ARCHIVE_DIR = common.ARCHIVE_DIR
STOP_FILE = common.ROOT / "STOP"
REPORT_FILE = common.ROOT / "REPORT.md"
# Untracked paths the human or the loop owns: never counted as files an agent created.
HUMAN_PATHS = ("STOP", "IDEA.md", "PLAN.md", "REPORT.md", "next_proposal.json", "proposals/")

SETUP, NOISE, REPORT, DONE = "setup", "noise", "report", "done"
REPAIRABLE = ("exception",)  # a typo or a shape error: worth one repair by the agent
STATE_VERSION = 1
POLL_SECONDS = 0.2
FAILPOINT = "AUTORESEARCH_LOOP_KILL_AT"  # tests: "STAGE:ITERATION" makes the loop SIGKILL itself there

DEFAULTS = {
    "agent": "random", "agent_command": None, "agent_bin": None, "agent_args": None, "max_turns": 30,
    "agent_timeout": 1800, "allow_install": False, "max_experiments": None, "hours": None, "plateau": None,
    "max_failures": 5, "seed": 0, "timeout": None, "train_command": None, "gpu": None, "gpus": None,
    "noise_runs": 2, "no_referee": False, "no_sandbox": False, "golf": False,
    "sampler": "tpe", "study_storage": None, "study_name": None, "track": None,  # --agent optuna; tracking
}
SETUP_FLAGS = ("noise_runs", "no_referee", "no_sandbox", "golf", "track")  # fixed by the session: start only


class Fatal(Exception):
    """The loop cannot go on (the baseline crashed, a helper refused): stop with this reason."""


def editable_files():
    """The files a proposal may change: train.py, or an external task's editable files."""
    current = task.load()
    return current.editable if current else ("train.py",)


def rel(path):
    return os.path.relpath(path, common.ROOT)


def say(text):
    """The loop's console: one line per event, flushed (a --background loop writes it to loop.log)."""
    print(f"{datetime.datetime.now():%H:%M:%S} {text}", flush=True)


# ---------------------------------------------------------------------------
# State


def load_state():
    return common.read_json(STATE_FILE)


def save_state(state):
    state["updated_at"] = common.now_iso()
    common.write_json_atomic(STATE_FILE, state)


def iteration_dir(number):
    path = LOOP_DIR / f"{number:04d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def acquire_lock():
    """An exclusive lock on runs/loop/loop.lock for the life of this process, or a Refusal.
    The kernel drops it when the process dies, however it dies, so a stale lock cannot exist."""
    LOOP_DIR.mkdir(parents=True, exist_ok=True)
    handle = open(LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        pid = ((load_state() or {}).get("process") or {}).get("pid")
        raise common.Refusal(f"a loop is already running in this worktree (pid {pid}): "
                             "uv run scripts/loop.py status, or stop") from None
    return handle


def loop_running():
    """True while some process holds the loop's lock."""
    if not LOCK_FILE.exists():
        return False
    with open(LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


# ---------------------------------------------------------------------------
# Git and the working tree


def untracked_files():
    """Untracked, not ignored files (runs/, notes.md and the ledger are ignored, so never listed)."""
    listed = common.git("ls-files", "--others", "--exclude-standard", "-z")
    return sorted(path for path in listed.split("\0") if path and not path.startswith(HUMAN_PATHS))


def new_untracked_files(current):
    return sorted(set(untracked_files()) - set(current.get("untracked_before", [])))


def restore_tree(current):
    """The working tree as the iteration found it: tracked files at its parent commit, files an
    agent created removed. The ledger, runs/ and notes.md are ignored, so a reset never touches them."""
    common.reset_hard(current["parent"])
    for path in new_untracked_files(current):
        (common.ROOT / path).unlink(missing_ok=True)


def helper(script, *args, check=True):
    """Run one of the helpers in scripts/ with this Python; (exit code, its stdout and stderr)."""
    result = subprocess.run([sys.executable, str(common.SCRIPTS_DIR / script), *args], cwd=common.ROOT,
                            capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if check and result.returncode != 0:
        raise Fatal(f"{script} {' '.join(args)} failed: {output.splitlines()[-1] if output else result.returncode}")
    return result.returncode, output


def branch_exists(branch):
    return bool(common.git("rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False))


def choose_tag(requested):
    """The requested tag, or today's (as setup.py names sessions) with -2, -3 ... when taken."""
    if requested:
        if branch_exists(common.BRANCH_PREFIX + requested):
            raise common.Refusal(f"branch {common.BRANCH_PREFIX}{requested} already exists: choose another --tag")
        return requested
    today = datetime.date.today()
    base = f"{today.strftime('%b').lower()}{today.day}"
    tag, suffix = base, 1
    while branch_exists(common.BRANCH_PREFIX + tag):
        suffix += 1
        tag = f"{base}-{suffix}"
    return tag


# ---------------------------------------------------------------------------
# The loop


class Loop:
    def __init__(self, state):
        self.state = state
        self.options = state["options"]
        self.experiment = None  # the experiment.py process this loop started, while it runs

    # -- driving ------------------------------------------------------------------------------

    def run(self):
        """Run stages until a stop; returns the exit code."""
        state = self.state
        state["process"] = {"pid": os.getpid(), **common.process_marker(), "started_at": common.now_iso()}
        if state["stage"] != REPORT:  # at report, the reason found by stop-check is what the report says
            state["stop_reason"] = None
        save_state(state)
        try:
            while state["stage"] != DONE:
                stage = state["stage"]
                pause = self.pause_reason(stage)
                if pause:
                    state["stop_reason"] = pause
                    save_state(state)
                    self.write_report()
                    say(f"paused before {stage}: {pause}; report in {rel(REPORT_FILE)}")
                    return 0
                self.failpoint(stage)
                next_stage = getattr(self, "stage_" + stage.replace("-", "_"))()
                state["stage"] = next_stage
                save_state(state)
        except Fatal as error:
            state["stop_reason"] = str(error)
            save_state(state)
            self.write_report()
            say(f"stopped: {error}")
            return 1
        finally:
            self.stop_agent()
        say(f"finished: {state['stop_reason']}; report in {rel(REPORT_FILE)}")
        return 0

    def failpoint(self, stage):
        """Tests kill the loop for real at a chosen stage (after the stage is recorded, before its work)."""
        target = os.environ.get(FAILPOINT)
        if target and target == f"{stage}:{self.state['iteration']}":
            os.kill(os.getpid(), signal.SIGKILL)

    def pause_reason(self, stage):
        """Why the loop must stop before `stage` (the human's STOP file), or None."""
        if stage != REPORT and STOP_FILE.exists():
            return "the STOP file is present (uv run scripts/loop.py stop, or a human)"
        return None

    # -- set-up -------------------------------------------------------------------------------

    def stage_setup(self):
        state = self.state
        if common.load_manifest() is None and task.load() is None:  # an external task brings its own data
            self.prepare_data()
        session = common.load_session()
        if not (session and session.get("branch") == state["branch"]):
            self.undo_half_setup()
            args = ["--tag", state["tag"], "--noise-runs", "0"]  # the noise stage measures it, resumably
            args += ["--deadline", state["deadline"]] if state.get("deadline") else []
            args += ["--no-referee"] if self.options.get("no_referee") else []
            args += ["--no-sandbox"] if self.options.get("no_sandbox") else []
            args += ["--golf"] if self.options.get("golf") else []
            args += ["--track", self.options["track"]] if self.options.get("track") else []
            args += ["--gpus", str(self.options["gpus"])] if self.options.get("gpus") else []  # the noise runs' too
            say(helper("setup.py", *args)[1])
        return NOISE

    def stage_noise(self):
        """setup.py --measure-noise for the noise runs still missing: the baseline's code under other
        seeds. Each finished run is saved in session.json, so a resume runs only the rest."""
        state = self.state
        wait_for_process(state.get("noise_process"))  # one left running by a killed loop
        missing = self.options.get("noise_runs", 0) - len((common.load_session() or {}).get("noise_runs") or [])
        if missing > 0:
            say(f"measuring the noise: {missing} run{'s' * (missing != 1)} of the baseline under other seeds")
            output = iteration_dir(0) / "noise.out"
            with open(output, "wb") as handle:
                process = subprocess.Popen([sys.executable, str(common.SCRIPTS_DIR / "setup.py"), "--measure-noise",
                                            "--noise-runs", str(missing)], cwd=common.ROOT, stdout=handle,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            state["noise_process"] = {**common.process_marker(), "pid": process.pid}
            save_state(state)
            code = process.wait()
            state["noise_process"] = None
            text = output.read_text(errors="replace").strip()
            say(text)
            if code != 0:  # the baseline's code does not run: the baseline would fail the same way
                raise Fatal(f"the noise runs of the baseline failed: {text.splitlines()[-1] if text else code}")
        self.new_iteration(0, {"source": "baseline", "description": "baseline",
                               "hypothesis": "train.py as it is: the starting point every result is compared with"})
        return "commit"

    def prepare_data(self):
        state = self.state
        args = ["--dataset", state.get("dataset") or "climbmix", "--profile", state.get("profile") or "auto"]
        say(f"no prepared data in {common.cache_dir()}: running prepare.py {' '.join(args)} "
            f"(log {rel(PREPARE_LOG)})")
        with open(PREPARE_LOG, "wb") as log:
            code = subprocess.run([sys.executable, str(common.PREPARE_FILE), *args], cwd=common.ROOT,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if code != 0 or common.load_manifest() is None:
            last = [line for line in common.read_tail(PREPARE_LOG, 4096).splitlines() if line.strip()][-1:]
            raise Fatal(f"prepare.py failed (exit {code}): {last[0] if last else 'no output'}")

    def undo_half_setup(self):
        """setup.py killed after creating the branch but before writing the session: go back."""
        state = self.state
        if not branch_exists(state["branch"]):
            return
        if common.git("rev-parse", state["branch"]) != state["start_commit"]:
            raise Fatal(f"branch {state['branch']} exists with commits of its own: not ours to remove")
        if common.current_branch() == state["branch"]:
            common.git("checkout", "-q", state.get("start_branch") or state["start_commit"])
        common.git("branch", "-q", "-D", state["branch"])

    def new_iteration(self, number, proposal=None):
        self.state["iteration"] = number
        self.state["current"] = {
            "number": number, "parent": common.head_commit(), "started_at": common.now_iso(), "attempt": 1,
            "proposal": proposal, "runs": [], "agent_calls": [], "outcome": None, "reason": None,
            "untracked_before": untracked_files(),
        }

    # -- propose, apply, validate -------------------------------------------------------------

    def stage_propose(self):
        current = self.state["current"]
        self.stop_agent()  # an agent left running by a killed loop
        restore_tree(current)
        if current["attempt"] > 1:
            return self.propose_repair()
        queued = proposers.queued_proposal_files()
        if queued:
            proposal, error = proposers.read_queued_proposal(queued[0])
            if error:
                current["proposal"] = {"source": "queue", "queue_file": str(queued[0]), "description": queued[0].name,
                                       "hypothesis": "-"}
                return self.not_run("rejected", error)
            current["proposal"] = proposal
            if proposal["instructions"]:
                if self.options["agent"] in ("random", "optuna"):
                    return self.not_run("rejected", "queued instructions need an agent (start with --agent claude, "
                                        "codex, opencode or command); the random proposer can only apply a patch")
                return self.propose_with_agent(proposal["instructions"])
            return "apply"
        if self.options["agent"] == "random":
            return self.propose_random()
        if self.options["agent"] == "optuna":
            return self.propose_optuna()
        return self.propose_with_agent(None)

    def propose_random(self):
        state, path = self.state, editable_files()[0]
        manifest = {} if task.load() else common.require_manifest()
        proposal = proposers.random_proposal((common.ROOT / path).read_text(), manifest.get("profile"),
                                             manifest.get("max_seq_len"), self.options["seed"], state["iteration"],
                                             state.setdefault("tried", []), path=path)
        if proposal is None:
            raise Fatal(f"the random proposer found no untried setting to perturb in {path}'s hyperparameter block "
                        "(UPPER_CASE = number lines at the top level)")
        state["tried"].append(proposal["key"])
        state["current"]["proposal"] = proposal
        return "apply"

    def propose_optuna(self):
        import search  # optuna costs a second to import: only for this proposer

        self.state["current"]["proposal"] = search.propose(self.state, common.TRAIN_FILE.read_text(),
                                                           common.require_manifest())
        return "apply"

    def propose_with_agent(self, instructions):
        current = self.state["current"]
        answer, error = self.call_agent("propose", instructions=instructions)
        if error:
            return self.not_run("agent_error", error)
        proposal = current["proposal"] or {"source": "agent"}
        proposal.update(description=proposal.get("description") or answer["description"],
                        hypothesis=answer["hypothesis"],
                        plan=answer.get("plan"), patch=common.git("diff", "HEAD", "--binary") + "\n",
                        new_files=new_untracked_files(current), agent=self.options["agent"])
        if proposal["patch"].strip() == "":
            proposal["patch"] = None
        current["proposal"] = proposal
        return "apply"

    def propose_repair(self):
        """The crashed train.py back in place, and the agent asked to fix the bug, not the idea."""
        current = self.state["current"]
        crashed = current["runs"][-1]
        for path in editable_files():
            (common.ROOT / path).write_text(common.git("show", f"{crashed['commit']}:{path}") + "\n")
        answer, error = self.call_agent("repair", crash=crashed)
        if error:
            return self.not_run("agent_error", error)
        current["proposal"].update(patch=common.git("diff", "HEAD", "--binary") + "\n",
                                   new_files=new_untracked_files(current), repair=answer["hypothesis"])
        return "apply"

    def not_run(self, outcome, reason):
        """End the iteration without training (outcome rejected or agent_error): the tree as it was, the reason kept."""
        current = self.state["current"]
        restore_tree(current)
        current["outcome"], current["reason"] = outcome, reason
        say(f"{current['number']:04d} {outcome.replace('_', ' ')}: {reason}")
        return "remember"

    def stage_apply(self):
        current = self.state["current"]
        archive_consumed(current)
        restore_tree(current)
        patch = current["proposal"].get("patch")
        if patch:
            path = iteration_dir(current["number"]) / f"proposal-{current['attempt']}.patch"
            path.write_text(patch)
            result = subprocess.run(["git", "apply", "--whitespace=nowarn", str(path)], cwd=common.ROOT,
                                    capture_output=True, text=True)
            if result.returncode != 0:
                why = proposers.snippet(result.stderr)
                return self.not_run("rejected", f"the patch does not apply to train.py: {why}")
        for name in current["proposal"].get("new_files") or []:
            (common.ROOT / name).touch()  # recreated empty, so validate sees and rejects them
        return "validate"

    def stage_validate(self):
        current, session = self.state["current"], common.require_session()
        changed, editable = common.changed_tracked_files(), editable_files()
        problems, allowed = [], " and ".join(editable)
        others = [path for path in changed if path not in editable]
        if others:
            problems.append(f"it changed {', '.join(others)}: only {allowed} may change")
        created = sorted(set(new_untracked_files(current)) | set(current["proposal"].get("new_files") or []))
        if created:
            problems.append(f"it created {', '.join(created)}: only {allowed} may change")
        if session.get("task") == "external":  # its pin is autoresearch.toml's; experiment.py checks the rest
            if runner.pin_problem(session):
                problems.append(runner.pin_problem(session))
        elif not common.PREPARE_FILE.exists() or common.sha256_file(common.PREPARE_FILE) != session["prepare_sha256"]:
            problems.append("prepare.py no longer matches the hash pinned at setup")
        installed = [name for call in current["agent_calls"] for name in call.get("installed") or []]
        if installed and not self.options["allow_install"]:
            problems.append(f"packages were installed without --allow-install: {', '.join(installed)}")
        if not set(editable) & set(changed) and not problems:
            problems.append(f"{allowed} unchanged: there is nothing to test")
        return self.not_run("rejected", "; ".join(problems)) if problems else "commit"

    # -- commit, train, triage, record, decide ------------------------------------------------

    def stage_commit(self):
        if common.load_pending() is None:  # else experiment.py started before a kill: stage_train waits for it
            current = self.state["current"]
            description = current["proposal"]["description"] + (" (repair)" if current["attempt"] > 1 else "")
            self.experiment = self.start_experiment_py(description)
            while self.experiment.poll() is None and not (common.load_pending() or {}).get("commit"):
                time.sleep(POLL_SECONDS / 4)
        return "train"

    def stage_train(self):
        if self.experiment is not None:
            code, self.experiment = self.experiment.wait(), None
            output = self.experiment_output().read_text(errors="replace")
            if common.load_pending() is None:
                raise Fatal(f"experiment.py did not start the experiment (exit {code}): {output.strip()}")
            say(output.strip())
        else:  # resumed: an experiment.py of the killed loop may still be training
            pending = common.load_pending()
            if pending is None:
                return "validate"  # killed before experiment.py wrote anything: train.py is still as validated
            while common.pending_state(pending) == "running":
                time.sleep(POLL_SECONDS * 5)
                pending = common.load_pending()
        return "triage"

    def experiment_output(self):
        current = self.state["current"]
        return iteration_dir(current["number"]) / f"experiment-{current['attempt']}.out"

    def start_experiment_py(self, *args):
        """experiment.py with the loop's training options. Its output goes to a file, not a pipe: if this
        loop is killed, experiment.py still finishes and records its result for the resumed loop."""
        command = [sys.executable, str(common.SCRIPTS_DIR / "experiment.py"), *args]
        for flag, key in (("--timeout", "timeout"), ("--train-command", "train_command"), ("--gpus", "gpus")):
            if self.options.get(key) is not None:
                command += [flag, str(self.options[key])]
        with open(self.experiment_output(), "ab") as output:
            return subprocess.Popen(command, cwd=common.ROOT, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT)

    def stage_triage(self):
        current = self.state["current"]
        pending = common.load_pending()
        if pending is None:  # decided already (a kill between decide.py and the state write)
            return "decide" if current.get("run") else "validate"
        summary = {}
        if pending.get("run_dir"):
            summary = common.read_json(common.ROOT / pending["run_dir"] / "summary.json") or {}
        finished = common.pending_state(pending) == "finished"
        if not finished and not pending.get("commit") and common.head_commit() == pending["parent"]:
            helper("decide.py", "discard")  # killed before its commit: nothing ran; clear it and run it now
            return "validate"
        failure = summary.get("triage") or {}
        run = {"id": pending["id"], "commit": pending.get("commit"), "run_dir": pending.get("run_dir"),
               "status": pending.get("status") if finished else "crash",
               "val_bpb": pending.get("val_bpb"), "memory_gb": pending.get("memory_gb"),
               "verdict": pending.get("verdict") if finished else "crash",
               "triage": failure.get("kind") if finished else "interrupted",
               "detail": failure.get("detail") if finished else "the run was interrupted before it finished",
               "excerpt": failure.get("excerpt") or [],
               "best_before": (summary.get("best_before") or {}).get("val_bpb"),
               "delta_vs_best": summary.get("delta_vs_best")}
        current["run"] = run
        current["action"] = next_action(pending)
        return "confirm" if current["action"] == "confirm" else "record"

    def stage_confirm(self):
        """A marginal win: experiment.py --confirm re-runs it under a new seed and judges the mean;
        then triage reads the new verdict. A confirmation left running by a killed loop is waited for."""
        pending = common.load_pending()
        while pending and common.pending_state(pending) == "running":
            time.sleep(POLL_SECONDS * 5)
            pending = common.load_pending()
        if pending and pending.get("next") == common.CONFIRM_COMMAND:
            before = self.experiment_output().stat().st_size if self.experiment_output().exists() else 0
            code = self.start_experiment_py("--confirm").wait()
            output = self.experiment_output().read_text(errors="replace")[before:].strip()
            say(output)
            if code == 2:
                raise Fatal(f"experiment.py --confirm refused: {output}")
        return "triage"

    def stage_record(self):
        write_iteration_record(self.state)
        return "decide"

    def stage_decide(self):
        """decide.py writes the ledger row and resets on a discard; run again after a kill, it
        finishes the same decision instead of writing a second row. The noise-aware rules
        (confirmation re-runs of marginal gains, `invalid`) live in decide.py and experiment.py,
        so the loop inherits them by deciding only through decide.py."""
        current = self.state["current"]
        run = current["run"]
        if common.load_pending() is not None:
            code, output = helper("decide.py", current["action"], check=False)
            if code == 2 and current["action"] == "keep":  # refused: decide.py's rule is the one that counts
                code, output = helper("decide.py", "discard", check=False)
            if code != 0:
                raise Fatal(f"decide.py failed: {output}")
            say(output)
        decision = (common.read_json(common.ROOT / run["run_dir"] / "summary.json") or {}).get("decision") \
            if run.get("run_dir") else None
        run["decision"] = (decision or {}).get("status") or ("crash" if run["status"] != "ok" else "discard")
        if not any(earlier["id"] == run["id"] for earlier in current["runs"]):
            current["runs"].append(run)
        current["run"] = None
        if self.state["iteration"] == 0 and run["decision"] != "keep":
            self.new_iteration(0, current["proposal"])  # a resume after the fix runs the baseline again
            self.state["stage"] = "commit"
            raise Fatal(f"the baseline did not run ({run['triage']}: {run['detail']}): fix train.py or the data, "
                        "then start again")
        agent_made = current["proposal"].get("source") in ("agent", "queue") and current["agent_calls"]
        if run["decision"] == "crash" and run["triage"] in REPAIRABLE and agent_made and current["attempt"] == 1:
            current["attempt"] = 2
            say(f"{current['number']:04d} crashed ({run['detail']}): one repair attempt by the agent")
            return "propose"
        current["outcome"] = run["decision"]
        return "remember"

    # -- remember, stop-check, report ---------------------------------------------------------

    def stage_remember(self):
        current = self.state["current"]
        archive_consumed(current)
        remember_in_notes(self.state)
        if self.options["agent"] == "optuna":
            import search

            search.tell(self.state)  # the study learns the outcome (idempotent after a kill)
        plan = (current["proposal"] or {}).get("plan")
        if plan and proposers.IDEA_FILE.exists() and not proposers.PLAN_FILE.exists():
            proposers.PLAN_FILE.write_text(str(plan).strip() + "\n")
        write_iteration_record(self.state)
        return "stop-check"

    def stage_stop_check(self):
        state, current = self.state, self.state["current"]
        if state["iteration"] > 0:
            failed = current["outcome"] not in ("keep", "discard", common.CONSTRAINT_STATUS)  # a result, if unkeepable
            state["failures_in_a_row"] = state.get("failures_in_a_row", 0) + 1 if failed else 0
        reason = limit_reached(state, common.read_ledger())
        self.new_iteration(state["iteration"] + 1)
        if reason:
            state["stop_reason"] = reason
            return REPORT
        return "propose"

    def stage_report(self):
        self.write_report()
        self.state["finished_at"] = common.now_iso()
        return DONE

    def write_report(self):
        plot, ledger = common.PROGRESS_PLOT, common.LEDGER_FILE
        stale = not plot.exists() or (ledger.exists() and ledger.stat().st_mtime >= plot.stat().st_mtime)
        if stale and common.experiments(common.read_ledger()):  # plot.py costs seconds: only for new rows
            code, output = helper("plot.py", check=False)
            if code != 0:
                say(f"progress.png not drawn: {output}")
        write_report(self.state)

    # -- agents -------------------------------------------------------------------------------

    def call_agent(self, kind, instructions=None, crash=None):
        """One call of the agent CLI; (answer, None) or (None, a one-line error). The call is
        recorded in the iteration (cost, turns, errors, what it installed)."""
        state, current, options = self.state, self.state["current"], self.options
        folder = iteration_dir(current["number"])
        name = f"agent-{current['attempt']}"
        prompt = proposers.build_prompt(state, kind, instructions, crash)
        prompt_file = folder / f"{name}.prompt.md"
        prompt_file.write_text(prompt)
        argv, stdin_text = proposers.agent_command(options["agent"], prompt, prompt_file, options)
        # AUTORESEARCH_HEADLESS: the Stop hook lets a one-iteration run end. PWD: OpenCode takes
        # its project from $PWD, not from its cwd, so an inherited one would send it to another
        # worktree (seen: a lane's agent working in the main checkout).
        env = dict(os.environ, AUTORESEARCH_HEADLESS="1", PWD=str(common.ROOT))
        if options["allow_install"]:
            env["AUTORESEARCH_ALLOW_INSTALL"] = "1"
        before = proposers.installed_packages()
        started = time.monotonic()
        code, timed_out = self.run_agent_process(argv, stdin_text, env, folder / f"{name}.out", folder / f"{name}.err")
        stdout = (folder / f"{name}.out").read_text(errors="replace")
        stderr = (folder / f"{name}.err").read_text(errors="replace")
        answer, meta, error = proposers.parse_agent_output(options["agent"], stdout, stderr)
        if timed_out:
            answer, error = None, f"no answer within --agent-timeout {options['agent_timeout']} s: the agent was killed"
        elif code != 0 and error:
            error = f"the agent exited with code {code}: {proposers.last_lines(stderr or stdout)}"
        installed = sorted(set(proposers.installed_packages()) - set(before))
        current["agent_calls"].append({
            "kind": kind, "command": [prompt_file.name if word == prompt else word for word in argv],
            "prompt_file": rel(prompt_file), "exit_code": code, "timed_out": timed_out,
            "seconds": round(time.monotonic() - started, 1), "error": error, "installed": installed,
            "answer": answer, **meta})
        if installed:
            state.setdefault("installed", []).extend(installed)
        return answer, error

    def run_agent_process(self, argv, stdin_text, env, out_path, err_path):
        """Run the agent in its own process group, killed whole at --agent-timeout; (exit code, timed out)."""
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                process = subprocess.Popen(argv, cwd=common.ROOT, env=env, stdout=out, stderr=err,
                                           stdin=subprocess.PIPE if stdin_text else subprocess.DEVNULL,
                                           start_new_session=True)
        except OSError as error:
            err_path.write_text(f"could not start {argv[0]}: {error}\n")
            return 127, False
        self.state["agent_process"] = {"pgid": process.pid, **common.process_marker()}
        save_state(self.state)  # so that a resumed loop can stop it if this one is killed
        timed_out = False
        try:
            if stdin_text:
                try:
                    process.stdin.write(stdin_text.encode())
                    process.stdin.close()
                except BrokenPipeError:
                    pass
            process.wait(timeout=self.options["agent_timeout"])
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if runner.process_group_alive(process.pid):
                runner.stop_process_group(process.pid, grace=2, reap=process.poll)
            process.wait()
        self.state["agent_process"] = None
        return process.returncode, timed_out

    def stop_agent(self):
        """Stop an agent whose loop was killed (its process group, if it still runs on this machine)."""
        agent = self.state.get("agent_process")
        if agent and agent.get("boot_id") == common.boot_id() and agent.get("host") == os.uname().nodename:
            if runner.process_group_alive(agent["pgid"]):
                runner.stop_process_group(agent["pgid"], grace=2)
        self.state["agent_process"] = None


# ---------------------------------------------------------------------------
# Stop conditions


def next_action(pending):
    """keep, discard or confirm: what experiment.py says comes next (pending.json's `next`); a run
    that never finished is discarded (decide.py records it as a crash)."""
    step = pending.get("next") if common.pending_state(pending) == "finished" else None
    if step == common.CONFIRM_COMMAND:
        return "confirm"
    return "keep" if step == common.KEEP_COMMAND else "discard"


def wait_for_process(marker):
    """Wait while the process a marker names runs on this machine (a child of an earlier, killed loop)."""
    while marker and marker.get("boot_id") == common.boot_id() and marker.get("host") == os.uname().nodename \
            and common.pid_alive(marker["pid"]):
        time.sleep(POLL_SECONDS * 5)


def experiments_after_baseline(rows):
    return max(0, len(common.experiments(rows)) - 1)


def since_best(rows):
    """Experiments run since the best result so far was reached (0 when the last one is the best)."""
    runs = common.experiments(rows)
    best = common.best_ever(rows)
    if best is None:
        return 0
    where = max(i for i, row in enumerate(runs) if row.status == "keep" and row.val_bpb == best.val_bpb)
    return len(runs) - 1 - where


def limit_reached(state, rows):
    """Why the loop stops after this iteration, or None."""
    options = state["options"]
    done = experiments_after_baseline(rows)
    if options.get("max_experiments") is not None and done >= options["max_experiments"]:
        return f"--max-experiments {options['max_experiments']} reached ({done} experiments after the baseline)"
    if state.get("deadline") and datetime.datetime.now(datetime.timezone.utc) >= common.parse_iso(state["deadline"]):
        return f"the deadline {state['deadline']} (--hours {options['hours']}) has passed"
    if options.get("plateau") and done and since_best(rows) >= options["plateau"]:
        return f"plateau: no improvement in the last {since_best(rows)} experiments (--plateau {options['plateau']})"
    if options.get("max_failures") and state.get("failures_in_a_row", 0) >= options["max_failures"]:
        return (f"{state['failures_in_a_row']} iterations in a row without a result (crashes, rejected proposals, "
                f"agent errors; --max-failures {options['max_failures']})")
    return None


# ---------------------------------------------------------------------------
# Files the loop writes: queue archive, iteration records, notes, report


def archive_consumed(current):
    """Move a used queue file to runs/loop/proposals/<iteration>-<name> (idempotent)."""
    source = (current.get("proposal") or {}).get("queue_file")
    if source and Path(source).exists():
        CONSUMED_DIR.mkdir(parents=True, exist_ok=True)
        os.replace(source, CONSUMED_DIR / f"{current['number']:04d}-{Path(source).name}")


def write_iteration_record(state):
    current = state["current"]
    record = {key: value for key, value in current.items() if key != "untracked_before"}
    record.update(agent=state["options"]["agent"], tag=state["tag"])
    common.write_json_atomic(iteration_dir(current["number"]) / "iteration.json", record)


def block_name(current):
    return f"[loop {current['number']:04d}] {(current.get('proposal') or {}).get('description', '?')}"


def analysis_lines(current):
    runs = current["runs"]
    if not runs:
        return [f"- result: not run: {current['outcome']}: {current['reason']}",
                "- vs expected: -", "- why: the proposal never reached training",
                "- lesson: -"]
    run = runs[-1]
    if run["status"] == common.CONSTRAINT_STATUS:  # it ran and was measured, but broke a rule of the task file
        value = f"{run['val_bpb']:.6f}" if common.is_finite_number(run.get("val_bpb")) else "-"
        return [f"- result: constraint violation ({run['detail']}): {common.metric_name()} {value} self-reported, "
                f"never kept, run {run['id']} {str(run['commit'])[:7]}",
                "- vs expected: unusable: it broke a constraint of autoresearch.toml", f"- why: {run['detail']}",
                "- lesson: the idea must fit the task's constraints before its number counts"]
    if run["status"] != "ok":
        tried = " after one repair" if len(runs) > 1 else ""
        return [f"- result: crash{tried} ({run['triage']}: {run['detail']}), run {run['id']} {str(run['commit'])[:7]}",
                "- vs expected: worse: it did not finish", f"- why: {run['detail']}",
                "- lesson: the idea needs a working implementation before it can be judged"]
    delta = run.get("delta_vs_best")
    against = f"best {run['best_before']:.6f}, delta {delta:+.6f}" if delta is not None else "baseline"
    better = delta is None or common.beats(delta, 0)
    return [f"- result: {common.metric_name()} {run['val_bpb']:.6f} ({against}), {run.get('memory_gb') or 0:.1f} GB, "
            f"{run['decision']} (run {run['id']} {run['commit'][:7]})",
            f"- vs expected: {'better than the best' if better else 'no gain over the best'}",
            f"- why: {run['verdict']}",
            f"- lesson: {current['proposal']['description']}: "
            f"{'kept' if run['decision'] == 'keep' else 'discarded'}"
            + (f" ({delta:+.6f})" if delta is not None else "")]


def remember_in_notes(state):
    """Append the iteration's REASONING and ANALYSIS blocks to notes.md (once), and keep its Best
    Known Config current, so the next agent call starts from what this one learned."""
    current = state["current"]
    if not common.NOTES_FILE.exists():
        return
    text = common.NOTES_FILE.read_text()
    name = block_name(current)
    if common.log_block_heading("ANALYSIS", name) not in text:
        proposal = current.get("proposal") or {}
        evidence = (f"proposed by {proposal.get('source')}" +
                    (f" ({state['options']['agent']})" if proposal.get("source") == "agent" else ""))
        text = text.rstrip("\n") + "\n\n" + "\n".join([
            common.log_block_heading("REASONING", name), f"- hypothesis: {' '.join(str(proposal.get('hypothesis', '-')).split())}",
            f"- evidence: {evidence}", "- risk: unknown until it runs", "",
            common.log_block_heading("ANALYSIS", name), *analysis_lines(current)]) + "\n"
    best = common.best_kept(common.read_ledger())
    if best:
        lineage = [row.description for row in common.kept_lineage(common.read_ledger())[1:]]
        body = (f"- commit: {best.commit}\n- {common.metric_name()}: {best.val_bpb:.6f}\n"
                f"- what makes it different from the baseline: {'; '.join(lineage) or 'nothing: it is the baseline'}\n")
        text = re.sub(r"(^## Best Known Config[^\n]*\n)(.*?)(?=^## |\Z)", lambda m: m.group(1) + "\n" + body + "\n",
                      text, count=1, flags=re.M | re.S)
    temporary = common.NOTES_FILE.with_name(".notes.md.tmp")
    temporary.write_text(text)
    os.replace(temporary, common.NOTES_FILE)


def iteration_records():
    records = []
    for path in sorted(LOOP_DIR.glob("[0-9][0-9][0-9][0-9]/iteration.json")):
        record = common.read_json(path)
        if record:
            records.append(record)
    return records


def agent_totals(records):
    calls = [call for record in records for call in record.get("agent_calls") or []]
    costs = [call["cost_usd"] for call in calls if isinstance(call.get("cost_usd"), (int, float))]
    return {"calls": len(calls), "cost_usd": round(sum(costs), 4) if costs else None,
            "turns": sum(call.get("turns") or 0 for call in calls)}


def hours_since(iso):
    if not iso:
        return None
    return (datetime.datetime.now(datetime.timezone.utc) - common.parse_iso(iso)).total_seconds() / 3600


def write_report(state):
    """REPORT.md: the best result against the baseline, the diff between them, the ledger, the
    picture, totals, and why the loop stopped."""
    rows, columns = common.read_ledger(), common.ledger_columns()
    runs = common.experiments(rows)
    baseline = common.baseline_row(rows)
    best = common.best_ever(rows)
    records = iteration_records()
    totals = agent_totals(records)
    hours = hours_since(state.get("started_at"))
    metric, external = common.metric_name(), task.load()
    lines = [f"# autoresearch report: {state['tag']} ({state['branch']})", "",
             f"Stopped: {state.get('stop_reason') or 'still running'} ({common.now_iso()}).", ""]
    if external:
        lines += [f"Task {external.name} (autoresearch.toml, editing {', '.join(external.editable)}): {metric}, "
                  f"{external.direction} is better, read from each run's log. Every result is self-reported: the "
                  "task's script scores itself, with no referee.", ""]
    lines += ["## Result", ""]
    if baseline and best:
        delta = best.val_bpb - baseline.val_bpb
        lines += [f"| | commit | {metric} | description |", "| --- | --- | --- | --- |",
                  f"| baseline | {baseline.commit} | {baseline.val_bpb:.6f} | {baseline.description} |",
                  f"| best | {best.commit} | {best.val_bpb:.6f} | {best.description} |", "",
                  f"Best against baseline: {delta:+.6f} {metric} ({100 * delta / baseline.val_bpb:+.2f} %).", ""]
        diff = common.git("diff", baseline.commit, best.commit, "--", *editable_files(), check=False)
        lines += ["## Diff from baseline to best", "", "```diff", diff or "(none: the baseline is the best)", "```", ""]
    else:
        lines += ["No result yet: the baseline has not been recorded.", ""]
    counts = common.status_counts(rows)
    not_run = [record for record in records if record.get("outcome") in ("rejected", "agent_error")]
    lines += ["## Ledger", "",
              f"{len(runs)} runs ({experiments_after_baseline(rows)} experiments after the baseline): "
              + ", ".join(f"{name} {count}" for name, count in counts.items())
              + f"; {len(not_run)} iterations never reached training.", "",
              "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + common.format_row(row, columns).rstrip("\n").replace("\t", " | ") + " |" for row in rows]
    if not_run:
        lines += ["", "Iterations without a run:", ""]
        lines += [f"- {record['number']:04d} {record['outcome']}: {record.get('reason')}" for record in not_run]
    if (common.PROGRESS_PLOT).exists():
        lines += ["", "![progress](progress.png)"]
    cost = f"${totals['cost_usd']:.4f}" if totals["cost_usd"] is not None else "not reported"
    rate = f"{len(runs) / hours:.1f}" if hours else "-"
    lines += ["", "## Totals", "",
              f"- runs: {len(runs)} in {hours or 0:.2f} hours ({rate} per hour)",
              f"- proposer: {state['options']['agent']}; agent calls: {totals['calls']}, turns: {totals['turns']}, "
              f"cost: {cost}",
              f"- packages installed by the agent: {', '.join(state.get('installed') or []) or 'none'}"
              + (" (--allow-install)" if state["options"].get("allow_install") else ""),
              f"- stop conditions: {describe_limits(state, rows)}", ""]
    temporary = REPORT_FILE.with_name(".REPORT.md.tmp")
    temporary.write_text("\n".join(lines))
    os.replace(temporary, REPORT_FILE)


def describe_limits(state, rows):
    options, parts = state["options"], []
    if options.get("max_experiments") is not None:
        parts.append(f"experiments {experiments_after_baseline(rows)}/{options['max_experiments']}")
    if state.get("deadline"):
        left = -hours_since(state["deadline"])
        parts.append(f"deadline in {left:.2f} h" if left > 0 else "deadline passed")
    if options.get("plateau"):
        parts.append(f"plateau {since_best(rows)}/{options['plateau']}")
    if options.get("max_failures"):
        parts.append(f"failures in a row {state.get('failures_in_a_row', 0)}/{options['max_failures']}")
    return ", ".join(parts) or "none"


# ---------------------------------------------------------------------------
# status


def gather_status():
    state = load_state()
    if state is None:
        raise common.Refusal("no headless loop in this worktree: uv run scripts/loop.py start")
    rows = common.read_ledger()
    running = loop_running()
    process = state.get("process") or {}
    pending = common.load_pending()
    session = common.load_session() or {}
    in_flight = None
    if pending:
        budget = session.get("time_budget") or 0
        expected = typical_run_seconds() or budget  # start-up, evaluation and the referee come on top of training
        # A confirmation re-runs the commit after its first run has finished: its own clock.
        confirmation = pending.get("confirmation") or {}
        confirming = confirmation.get("state") == "running"
        elapsed = hours_since((confirming and confirmation.get("started_at")) or pending["started_at"]) * 3600
        in_flight = {"id": pending["id"], "description": pending.get("description"),
                     "state": common.pending_state(pending), "run": "confirmation" if confirming else "experiment",
                     "elapsed_s": round(elapsed, 1), "budget_s": budget, "budget": common.budget_text(session),
                     "expected_s": round(expected, 1),
                     "fraction": min(1.0, elapsed / expected) if expected else None,
                     "eta_s": max(0.0, round(expected - elapsed, 1)) if expected else None}
    best = common.best_ever(rows)
    baseline = common.baseline_row(rows)
    hours = hours_since(state.get("started_at"))
    runs = len(common.experiments(rows))
    return {
        "running": running, "pid": process.get("pid"),
        "process_alive": running or bool(process.get("pid") and process.get("boot_id") == common.boot_id()
                                         and common.pid_alive(process["pid"])),
        "stage": state["stage"], "iteration": state["iteration"], "agent": state["options"]["agent"],
        "tag": state["tag"], "branch": state["branch"], "stop_reason": state.get("stop_reason"),
        "in_flight": in_flight,
        "best": best._asdict() if best else None, "baseline": baseline._asdict() if baseline else None,
        "experiments": experiments_after_baseline(rows),
        "counts": common.status_counts(rows),
        "per_hour": round(runs / hours, 2) if hours else None,
        "limits": describe_limits(state, rows), "failures_in_a_row": state.get("failures_in_a_row", 0),
        "stop_file": STOP_FILE.exists(), "agent_totals": agent_totals(iteration_records()),
    }


def typical_run_seconds():
    """How long the last finished experiment took from start to result, or None before the first."""
    for path in sorted(common.RUNS_DIR.glob("[0-9][0-9][0-9][0-9]-*/summary.json"), reverse=True):
        summary = common.read_json(path) or {}
        finished = summary.get("finished_at") and summary.get("started_at")
        if summary.get("kind", "experiment") == "experiment" and finished:
            return (common.parse_iso(summary["finished_at"]) - common.parse_iso(summary["started_at"])).total_seconds()
    return None


def progress_bar(fraction, width=24):
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def print_status(status):
    if status["running"]:
        head = f"loop running (pid {status['pid']})"
    elif status["stage"] == DONE:
        head = f"loop finished: {status['stop_reason']}"
    elif status["stop_reason"]:
        head = f"loop stopped: {status['stop_reason']} (resume: uv run scripts/loop.py resume)"
    else:
        alive = " but its process is gone" if not status["process_alive"] else ""
        head = f"loop not running{alive} (resume: uv run scripts/loop.py resume)"
    print(f"{head}; {status['branch']}, agent {status['agent']}, stage {status['stage']}, "
          f"iteration {status['iteration']}" + ("; STOP requested" if status["stop_file"] else ""))
    flight = status["in_flight"]
    if flight:
        bar = progress_bar(flight["fraction"]) if flight["fraction"] is not None else ""
        eta = f", ETA {flight['eta_s']:.0f} s" if flight["eta_s"] is not None else ""
        run = ", its confirmation" if flight["run"] == "confirmation" else ""
        print(f"in flight: {flight['id']} {flight['description']} ({flight['state']}{run}) {bar} "
              f"{flight['elapsed_s']:.0f}/{flight['expected_s']:.0f} s (training budget {flight['budget']}){eta}")
    best, baseline = status["best"], status["baseline"]
    if best:
        print(f"best val_bpb {best['val_bpb']:.6f} ({best['commit']}: {best['description']}), "
              f"baseline {baseline['val_bpb']:.6f} ({best['val_bpb'] - baseline['val_bpb']:+.6f})")
    counts = ", ".join(f"{name} {count}" for name, count in status["counts"].items())
    rate = f", {status['per_hour']}/h" if status["per_hour"] else ""
    cost = status["agent_totals"]["cost_usd"]
    cost = f", agent cost ${cost:.4f}" if cost is not None else ""
    print(f"{status['experiments']} experiments after the baseline ({counts}){rate}{cost}")
    print(f"stop conditions: {status['limits']}")


# ---------------------------------------------------------------------------
# Command line


def add_run_options(parser, defaults):
    """The options start takes, and resume may change (None: keep what start recorded)."""
    d = (lambda key: DEFAULTS[key]) if defaults else (lambda key: None)
    agent = parser.add_argument_group("proposer")
    agent.add_argument("--agent", choices=proposers.AGENTS, default=d("agent"),
                       help="who proposes experiments: random (built-in search, no LLM; default), claude, codex, "
                       "opencode, or command (--agent-command)")
    agent.add_argument("--agent-command", metavar="TEMPLATE", default=d("agent_command"),
                       help="any agent CLI: {prompt} or {prompt_file} are replaced, else the prompt goes to stdin")
    agent.add_argument("--agent-bin", metavar="PATH", default=d("agent_bin"),
                       help="the agent executable (default: node_modules/.bin/<agent> if present, else the name)")
    agent.add_argument("--agent-args", metavar="ARGS", default=d("agent_args"),
                       help="extra words for the agent CLI, e.g. '--model sonnet'")
    agent.add_argument("--max-turns", type=int, metavar="N", default=d("max_turns"),
                       help=f"turn limit per agent call (default {DEFAULTS['max_turns']})")
    agent.add_argument("--agent-timeout", type=float, metavar="SECONDS", default=d("agent_timeout"),
                       help=f"wall-clock limit per agent call (default {DEFAULTS['agent_timeout']})")
    agent.add_argument("--allow-install", action="store_true", default=None,
                       help="let the agent install packages (uv pip install); recorded in the report. Off by default")
    agent.add_argument("--seed", type=int, default=d("seed"),
                       help="seed of the random proposer (default 0): the same seed proposes the same experiments")
    agent.add_argument("--sampler", choices=("tpe", "cmaes"), default=d("sampler"),
                       help="--agent optuna: TPE (default) or CMA-ES")
    agent.add_argument("--study-storage", metavar="URL", default=d("study_storage"),
                       help="--agent optuna: where the study lives (default sqlite:///runs/loop/optuna.db); lanes "
                       "share one through a file or database URL they all reach")
    agent.add_argument("--study-name", metavar="NAME", default=d("study_name"),
                       help="--agent optuna: the study's name (default: the session tag)")
    stop = parser.add_argument_group("stop conditions")
    stop.add_argument("--max-experiments", type=int, metavar="N", default=d("max_experiments"),
                      help="stop after N experiments after the baseline")
    stop.add_argument("--hours", type=float, metavar="H", default=d("hours"),
                      help="stop at the first stop-check H hours after the start")
    stop.add_argument("--plateau", type=int, metavar="N", default=d("plateau"),
                      help="stop after N experiments in a row without a new best")
    stop.add_argument("--max-failures", type=int, metavar="N", default=d("max_failures"),
                      help=f"stop after N iterations in a row without a result (crash, rejected proposal, agent "
                      f"error; default {DEFAULTS['max_failures']})")
    train = parser.add_argument_group("training")
    train.add_argument("--timeout", type=float, metavar="SECONDS", default=d("timeout"),
                       help="hard limit per training run (default: experiment.py's, twice the budget plus 120 s)")
    train.add_argument("--train-command", metavar="CMD", default=d("train_command"),
                       help="the training command (default: experiment.py's, this Python running train.py)")
    train.add_argument("--gpus", type=int, metavar="N", default=d("gpus"),
                       help="GPUs per training run, setup's noise runs included (setup.py's and experiment.py's "
                       "--gpus; default: the profile's, 8 for golf, else 1): N > 1 trains under torchrun")
    train.add_argument("--gpu", metavar="ID", default=d("gpu"),
                       help="pin this loop's training to these GPUs (CUDA_VISIBLE_DEVICES: 0, or 0,1 with --gpus 2)")


def add_session_options(parser):
    """setup.py's choices for the session, fixed at start."""
    parser.add_argument("--noise-runs", type=int, metavar="N", default=DEFAULTS["noise_runs"],
                        help=f"measure the noise with N runs of the baseline under other seeds before the loop "
                        f"(setup.py's --noise-runs; default {DEFAULTS['noise_runs']}, 0 skips it)")
    parser.add_argument("--no-referee", action="store_true",
                        help="do not re-score keep candidates with prepare.py (setup.py's --no-referee)")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="train without the sandbox (setup.py's --no-sandbox)")
    parser.add_argument("--golf", action="store_true",
                        help="parameter golf on this train.py: the int8+zlib round trip decides, artifacts "
                        "over 16,000,000 bytes are never kept (setup.py's --golf)")
    parser.add_argument("--track", choices=("mlflow", "wandb", "none"), default=DEFAULTS["track"],
                        help="record each experiment in MLflow or W&B (setup.py's --track; default: "
                        "$AUTORESEARCH_TRACK, else none)")


def add_control_options(parser):
    parser.add_argument("--background", action="store_true",
                        help="detach: run in its own session with output to runs/loop/loop.log")


def check_agent(options):
    if options["agent_command"] and options["agent"] in ("random", None):
        options["agent"] = "command"
    if options["agent"] == "command" and not options["agent_command"]:
        raise common.Refusal("--agent command needs --agent-command TEMPLATE")
    if options["agent"] == "optuna":
        import search

        if not search.installed():
            raise common.Refusal("--agent optuna needs Optuna: uv sync --group search")
    elif options["agent"] != "random" and options["agent"] != "command":
        binary = proposers.agent_binary(options["agent"], options["agent_bin"])
        rules = proposers.AGENT_RULES.get(options["agent"])
        if rules and not rules.exists():
            raise common.Refusal(f"--agent {options['agent']} runs under this repository's rules for it, and "
                                 f"{rel(rules)} is missing: restore it (git checkout -- {rel(rules)})")
        if options.get("allow_install") and options["agent"] in proposers.NO_INSTALLS:
            raise common.Refusal(f"--allow-install works with --agent claude only: "
                                 f"{proposers.NO_INSTALLS[options['agent']]} for the agent")
        if not proposers.which(binary):
            hint = " (npm ci installs the pinned one)" if options["agent"] in ("claude", "codex", "opencode") else ""
            raise common.Refusal(f"the {options['agent']} CLI is not installed ({binary}){hint}: "
                                 "or use --agent-bin PATH, or --agent random")
    if options.get("max_experiments") is not None and options["max_experiments"] < 0:
        raise common.Refusal("--max-experiments must be 0 or more (0: set-up and the baseline only)")
    for key in ("plateau", "max_failures", "max_turns", "gpus"):
        if options.get(key) is not None and options[key] < 1:
            raise common.Refusal(f"--{key.replace('_', '-')} must be at least 1")
    for key in ("hours", "agent_timeout", "timeout"):
        if options.get(key) is not None and options[key] <= 0:
            raise common.Refusal(f"--{key.replace('_', '-')} must be positive")


def detach(argv):
    """Start this same command again without --background, in its own session; output to loop.log."""
    LOOP_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_FILE, "ab") as log:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *[a for a in argv if a != "--background"]],
                                 cwd=common.ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=dict(os.environ, PWD=str(common.ROOT)))
    print(f"loop started in the background (pid {child.pid}); log {rel(LOG_FILE)}; "
          "uv run scripts/loop.py status | stop")
    return 0


def archive_finished_loop(state):
    """A finished loop's folder and report move to runs/archive/loop-<tag>[-N]/ before a new start."""
    target, suffix = ARCHIVE_DIR / f"loop-{state['tag']}", 1
    while target.exists():
        suffix += 1
        target = ARCHIVE_DIR / f"loop-{state['tag']}-{suffix}"
    target.mkdir(parents=True)
    for path in LOOP_DIR.iterdir():
        if path != LOCK_FILE:
            os.replace(path, target / path.name)
    if REPORT_FILE.exists():
        os.replace(REPORT_FILE, target / REPORT_FILE.name)


def command_start(args, argv):
    options = {key: getattr(args, key) for key in DEFAULTS}
    options["allow_install"] = bool(args.allow_install)
    check_agent(options)
    if options["noise_runs"] < 0:
        raise common.Refusal("--noise-runs must be 0 or more")
    if options["golf"] and (options["no_referee"] or task.load() is not None):
        raise common.Refusal("--golf is this train.py scored by the referee's int8+zlib round trip: not with "
                             "--no-referee, nor on an external task (its task file has its own constraints)")
    changed = common.changed_tracked_files()
    if changed:
        raise common.Refusal(f"uncommitted changes to tracked files ({', '.join(changed)}): "
                             "commit or revert them first")
    manifest = common.load_manifest()
    for key in ("dataset", "profile"):
        wanted = getattr(args, key)
        if manifest and wanted and wanted != "auto" and manifest.get(key) != wanted:
            raise common.Refusal(f"the data in {common.cache_dir()} was prepared with {key} {manifest.get(key)}, "
                                 f"not {wanted}: prepare it again (uv run prepare.py --{key} {wanted}) or drop --{key}")
    previous = load_state()
    if previous and previous["stage"] != DONE:
        raise common.Refusal(f"a loop is already set up here (stage {previous['stage']}): "
                             "uv run scripts/loop.py resume, or move runs/loop aside")
    if args.background:
        return detach(argv)
    lock = acquire_lock()  # noqa: F841  (held until this process exits)
    if previous:
        archive_finished_loop(previous)
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    tag = choose_tag(args.tag)
    deadline = None
    if args.hours:
        moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=args.hours)
        deadline = moment.isoformat(timespec="seconds")
    state = {
        "version": STATE_VERSION, "tag": tag, "branch": common.BRANCH_PREFIX + tag, "options": options,
        "dataset": args.dataset, "profile": args.profile, "deadline": deadline,
        "start_commit": common.head_commit(), "start_branch": common.current_branch(),
        "started_at": common.now_iso(), "stage": SETUP, "iteration": 0, "current": None,
        "failures_in_a_row": 0, "tried": [], "installed": [], "stop_reason": None, "agent_process": None,
        "noise_process": None,
    }
    save_state(state)
    say(f"loop {tag}: agent {options['agent']}, {describe_limits(state, [])}")
    return Loop(state).run()


def command_resume(args, argv):
    state = load_state()
    if state is None:
        raise common.Refusal("nothing to resume: no runs/loop/state.json here (uv run scripts/loop.py start)")
    overrides = {key: getattr(args, key) for key in DEFAULTS
                 if key not in SETUP_FLAGS and getattr(args, key) is not None}
    options = dict(state["options"], **overrides)
    check_agent(options)
    if args.background:
        if loop_running():
            raise common.Refusal("a loop is already running in this worktree: uv run scripts/loop.py status")
        return detach(argv)
    lock = acquire_lock()  # noqa: F841
    state["options"] = options
    if "hours" in overrides:
        moment = common.parse_iso(state["started_at"]) + datetime.timedelta(hours=options["hours"])
        state["deadline"] = moment.isoformat(timespec="seconds")
    if options.get("gpu") is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(options["gpu"])
    if STOP_FILE.exists():
        STOP_FILE.unlink()
        say("removed the STOP file: resuming")
    if state["stage"] == DONE:
        reason = limit_reached(state, common.read_ledger())
        if reason:
            raise common.Refusal(f"the loop stopped because {reason}: raise that limit to go on")
        state["stage"] = "propose"
    say(f"resuming loop {state['tag']} at stage {state['stage']}, iteration {state['iteration']}")
    return Loop(state).run()


def command_stop(_args, _argv):
    if load_state() is None:
        raise common.Refusal("no headless loop in this worktree")
    STOP_FILE.touch()
    running = "the loop stops after its current stage" if loop_running() else "no loop is running"
    print(f"created {rel(STOP_FILE)}: {running}; resume removes it")
    return 0


def command_status(args, _argv):
    status = gather_status()
    if args.json:
        print(json.dumps(status, sort_keys=True))
    else:
        print_status(status)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="The headless research loop: start, resume, status, stop.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="set up a session, run the baseline, then loop")
    start.add_argument("--tag", help="session name; the branch is autoresearch/<tag> (default: today, e.g. nov23)")
    start.add_argument("--dataset", help="prepare this dataset when no data is prepared (prepare.py's --dataset; "
                       "default climbmix; offline: builtin)")
    start.add_argument("--profile", help="prepare for this profile (prepare.py's --profile; default auto)")
    add_run_options(start, defaults=True)
    add_session_options(start)
    add_control_options(start)
    resume = commands.add_parser("resume", help="carry on from runs/loop/state.json after a stop, crash or kill")
    add_run_options(resume, defaults=False)
    add_control_options(resume)
    status = commands.add_parser("status", help="running or not, stage, experiment in flight, best, stop conditions")
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    commands.add_parser("stop", help="a clean stop after the current stage (creates the STOP file)")
    args = parser.parse_args(argv)
    handlers = {"start": command_start, "resume": command_resume, "status": command_status, "stop": command_stop}
    try:
        return handlers[args.command](args, argv)
    except KeyboardInterrupt:
        print("interrupted: uv run scripts/loop.py resume carries on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    common.run_main(main)
