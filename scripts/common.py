"""Shared by every helper in scripts/: paths, the ledger, the summary parser, triage, git, session files.

One source of truth for each path, file format and constant, so that setup, experiment, decide,
status, plot, the hooks and the headless loop can never disagree about them. Standard library
only, and cheap to import: the helpers run between experiments, inside an agent's turn.

Usage (from another script in scripts/ or from a hook):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # or the path to scripts/
    import common
    rows = common.read_ledger()
    best = common.best_kept(rows)
"""

import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

# ---------------------------------------------------------------------------
# Paths

ROOT = Path(__file__).resolve().parent.parent  # the repository this copy of scripts/ belongs to
SCRIPTS_DIR = ROOT / "scripts"
TRAIN_FILE = ROOT / "train.py"  # the one file the agent edits
PREPARE_FILE = ROOT / "prepare.py"  # the fixed protocol, pinned by hash at setup
LEDGER_FILE = ROOT / "results.tsv"
RUN_LOG = ROOT / "run.log"  # link to the latest run's log, so upstream's `grep "^val_bpb:" run.log` works
PROGRESS_PLOT = ROOT / "progress.png"
RUNS_DIR = ROOT / "runs"  # runs/<NNNN>-<commit7>/{run.log,summary.json}
SESSION_FILE = RUNS_DIR / "session.json"
PENDING_FILE = RUNS_DIR / "pending.json"
ARCHIVE_DIR = RUNS_DIR / "archive"  # earlier sessions, moved aside by setup
NOTES_FILE = ROOT / "notes.md"
MEMORY_DIR = ROOT / ".claude" / "context" / "memory"
TEMPLATES_DIR = ROOT / "skills" / "ml-experiment-loop" / "templates"

PREPARE_COMMAND = "uv run prepare.py"
PREPARE_COMMAND_OFFLINE = "uv run prepare.py --dataset builtin"


def cache_dir():
    """The data cache root: $AUTORESEARCH_CACHE, default ~/.cache/autoresearch."""
    return Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")


def manifest_path():
    """prepare.py writes this file last, so its existence means the data is ready."""
    return cache_dir() / "prepared" / "prepared.json"


def load_manifest():
    """The prepared-data manifest (profile, dataset, time_budget, ...), or None when not prepared."""
    try:
        return json.loads(manifest_path().read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise Refusal(f"{manifest_path()} is unreadable ({error}): run {PREPARE_COMMAND} again")


def require_manifest():
    manifest = load_manifest()
    if manifest is None:
        raise Refusal(f"data not prepared (no {manifest_path()}): run {PREPARE_COMMAND} "
                      f"(offline: {PREPARE_COMMAND_OFFLINE})")
    return manifest


# ---------------------------------------------------------------------------
# Errors: each becomes one line on stderr and an exit code, never a traceback


class Refusal(Exception):
    """The helper will not do what was asked; the message says why and what to do. Exit 2."""


class GitError(Exception):
    """A git command failed unexpectedly. Exit 1."""


def run_main(main):
    """Run a helper's main(), turning our errors into one stderr line and an exit code."""
    try:
        code = main()
    except Refusal as error:
        print(error, file=sys.stderr)
        code = 2
    except GitError as error:
        print(error, file=sys.stderr)
        code = 1
    sys.exit(code or 0)


# ---------------------------------------------------------------------------
# Files: atomic writes and hashes


def write_json_atomic(path, data):
    """Write JSON to a temporary file beside `path`, fsync, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path):
    """A JSON file's content, or None when it does not exist."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise Refusal(f"{path} is not valid JSON ({error}); move it aside and retry")


def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def helper_hashes():
    """sha256 of every helper script, pinned at setup so that a changed helper is noticed."""
    return {path.name: sha256_file(path) for path in sorted(SCRIPTS_DIR.glob("*.py"))}


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_iso(text):
    """An ISO-8601 time as an aware datetime; a time without zone is taken as local time."""
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.astimezone()


def read_tail(path, max_bytes=1 << 20):
    """The last `max_bytes` of a file as text: enough for the summary block or a traceback,
    cheap even when training printed 50 MB."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - max_bytes))
        return f.read().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# The ledger: results.tsv, upstream-compatible, appended atomically under a lock

LEDGER_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")
LEDGER_HEADER = "\t".join(LEDGER_COLUMNS) + "\n"
STATUSES = ("keep", "discard", "crash", "backtrack")
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{7,40}$")


class LedgerRow(NamedTuple):
    commit: str  # 7-character short hash, as upstream
    val_bpb: float  # 0.0 for a crash
    memory_gb: float  # peak VRAM in GB; 0.0 for a crash
    status: str  # one of STATUSES
    description: str


def format_row(row):
    """One ledger line. Tabs and newlines in the description would break the format: spaces instead."""
    description = " ".join(str(row.description).split())
    return f"{row.commit[:7]}\t{row.val_bpb:.6f}\t{row.memory_gb:.1f}\t{row.status}\t{description}\n"


def parse_row(line, number, path=LEDGER_FILE):
    """A LedgerRow from one line; anything else is a Refusal naming the file and line number."""
    where = f"{Path(path).name} line {number}"
    fields = line.rstrip("\n").split("\t")
    if len(fields) != len(LEDGER_COLUMNS):
        raise Refusal(f"{where}: expected {len(LEDGER_COLUMNS)} tab-separated fields "
                      f"({' '.join(LEDGER_COLUMNS)}), found {len(fields)}: fix or remove that line")
    commit, val_bpb, memory_gb, status, description = fields
    if not COMMIT_PATTERN.match(commit):
        raise Refusal(f"{where}: {commit[:40]!r} is not a commit hash: fix or remove that line")
    if status not in STATUSES:
        raise Refusal(f"{where}: status {status[:20]!r} is not one of {', '.join(STATUSES)}")
    try:
        numbers = float(val_bpb), float(memory_gb)
    except ValueError:
        raise Refusal(f"{where}: val_bpb and memory_gb must be numbers, "
                      f"found {val_bpb[:20]!r} and {memory_gb[:20]!r}") from None
    return LedgerRow(commit, numbers[0], numbers[1], status, description)


def read_ledger(path=LEDGER_FILE):
    """Every row of results.tsv in order ([] when the file does not exist yet)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    if lines and lines[0] != LEDGER_HEADER:
        raise Refusal(f"{Path(path).name} line 1: header is not {LEDGER_HEADER.strip()!r} "
                      "(tab-separated): not a ledger written by these helpers")
    return [parse_row(line, number, path) for number, line in enumerate(lines[1:], start=2)
            if line.strip()]


def _locked_append(path, text, header):
    """Append `text` with one write under an exclusive lock, then fsync; writes `header` first
    when the file is empty. Two processes appending at once give whole lines, never interleaved."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size == 0:
            text = header + text
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock


def append_ledger_row(row, path=LEDGER_FILE):
    _locked_append(path, format_row(row), LEDGER_HEADER)


def ensure_ledger(path=LEDGER_FILE):
    """Create results.tsv with its header when missing (an existing ledger is left alone)."""
    _locked_append(path, "", LEDGER_HEADER)


def experiments(rows):
    """Rows that are experiments (a backtrack row records a rewind, not a run)."""
    return [row for row in rows if row.status != "backtrack"]


def kept_lineage(rows):
    """The kept rows the branch currently builds on, oldest first.

    Every keep extends the lineage; a backtrack cuts it back to its target, so keeps made after
    the target no longer count as "best so far" for the experiments that follow."""
    lineage = []
    for row in rows:
        if row.status == "keep":
            lineage.append(row)
        elif row.status == "backtrack":
            targets = [i for i, kept in enumerate(lineage) if kept.commit == row.commit]
            lineage = lineage[:targets[-1] + 1] if targets else [row]
    return lineage


def best_kept(rows):
    """The kept row with the lowest val_bpb on the current lineage, or None before the baseline."""
    lineage = kept_lineage(rows)
    return min(lineage, key=lambda row: row.val_bpb) if lineage else None


def best_ever(rows):
    """The kept row with the lowest val_bpb of the whole session, or None."""
    kept = [row for row in rows if row.status == "keep"]
    return min(kept, key=lambda row: row.val_bpb) if kept else None


# ---------------------------------------------------------------------------
# Deciding: one rule, used by experiment.py (the verdict it prints) and decide.py (keep or refuse)

DEFAULT_NOISE_BPB = 0.001  # run-to-run spread of val_bpb assumed when the session has not measured it


def noise_band(session):
    """The session's measured noise (`noise_bpb` in session.json) when recorded, else the default."""
    noise = (session or {}).get("noise_bpb")
    return float(noise) if noise is not None else DEFAULT_NOISE_BPB


def verdict(val_bpb, best_val_bpb, noise, lines, parent_lines):
    """'baseline', 'improved', 'simpler' (within noise and train.py got shorter) or 'not improved'."""
    if best_val_bpb is None:
        return "baseline"
    if val_bpb < best_val_bpb:
        return "improved"
    if val_bpb - best_val_bpb <= noise and lines < parent_lines:
        return "simpler"
    return "not improved"


def keep_allowed(val_bpb, best_val_bpb, noise, lines, parent_lines):
    return (best_val_bpb is None or val_bpb <= best_val_bpb
            or verdict(val_bpb, best_val_bpb, noise, lines, parent_lines) == "simpler")


# ---------------------------------------------------------------------------
# train.py's summary block, and triage of runs that did not produce one

SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth")
SUMMARY_LINE = re.compile(r"^([A-Za-z_][\w.]*):\s*(.*?)\s*$")


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_summary(text):
    """The metrics of the last `---` block as a dict ({} when there is none or it lacks val_bpb).

    Numbers become int or float; extra `key: value` lines are kept as they are."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return {}
    metrics = {}
    for line in lines[starts[-1] + 1:]:
        match = SUMMARY_LINE.match(line.strip())
        if match:
            metrics[match.group(1)] = _number(match.group(2))
    return metrics if isinstance(metrics.get("val_bpb"), (int, float)) else {}


TRACEBACK_HEADER = "Traceback (most recent call last):"


def triage(log_tail, exit_code, timed_out, timeout_s=None):
    """Why a run produced no result: {'kind': ..., 'detail': one line, 'excerpt': a few lines}.

    kind is one of timeout, oom, fast_fail, exception, signal, no_summary; checked in that order
    because an out-of-memory error is also an exception, and a timeout ends in a signal."""
    lines = [line.rstrip() for line in log_tail.splitlines()]
    if timed_out:
        return {"kind": "timeout", "detail": f"no result within the {timeout_s:g} s timeout; "
                "the process group was killed", "excerpt": []}
    oom = [line for line in lines if "OutOfMemoryError" in line or "out of memory" in line.lower()]
    if oom:
        return {"kind": "oom", "detail": oom[-1].strip(), "excerpt": _traceback_frame(lines)}
    fast_fail = [line for line in lines if line.startswith("fast_fail:")]
    if exit_code == 3 or fast_fail:
        detail = fast_fail[-1] if fast_fail else "exit code 3 (fast fail: NaN or exploding loss)"
        return {"kind": "fast_fail", "detail": detail.strip(), "excerpt": []}
    exception = _exception_line(lines)
    if exception:
        return {"kind": "exception", "detail": exception, "excerpt": _traceback_frame(lines)}
    if exit_code is not None and exit_code < 0:
        number = -exit_code
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        hint = " (the kernel's out-of-memory killer?)" if number == signal.SIGKILL else ""
        return {"kind": "signal", "detail": f"killed by signal {number} ({name}){hint}",
                "excerpt": [line for line in lines if line.strip()][-1:]}
    return {"kind": "no_summary", "detail": f"exit code {exit_code}, no summary block (--- then val_bpb:)",
            "excerpt": [line for line in lines if line.strip()][-1:]}


def _exception_line(lines):
    """'Type: message' of the last traceback in the log, or None."""
    starts = [i for i, line in enumerate(lines) if line.startswith(TRACEBACK_HEADER)]
    if not starts:
        return None
    for line in lines[starts[-1] + 1:]:
        if line and not line[0].isspace():  # frames and source lines are indented; this is not
            return line.strip()
    return None


def _traceback_frame(lines):
    """The innermost `File "...", line N, in f` of the last traceback: where it happened."""
    frames = [line.strip() for line in lines if line.lstrip().startswith('File "')]
    return frames[-1:]


# ---------------------------------------------------------------------------
# Processes


def process_group_alive(pgid):
    """True while a live (not zombie) process remains in the process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    # killpg also reaches zombies nobody has reaped yet; on Linux look at each process's state.
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _parent, group = text[text.rfind(")") + 2:].split()[:3]
        if int(group) == pgid and state not in ("Z", "X"):
            return True
    return False


KILL_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL: time for training to release the GPU


def stop_process_group(pgid, grace=KILL_GRACE_SECONDS, reap=lambda: None):
    """SIGTERM the whole group, SIGKILL whatever is left after `grace` seconds: no child survives.
    `reap` is called while waiting, so the caller can collect its own child's exit status."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        if not process_group_alive(pgid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    reap()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------
# Git (subprocess; every helper runs at the repository root)


def git(*args, check=True):
    """stdout of `git ARGS` at the repository root, stripped; GitError with git's message on failure."""
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if check and result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise GitError(f"git {' '.join(args)} failed: {message[-1] if message else result.returncode}")
    return result.stdout.strip()


def current_branch():
    """The checked-out branch, or None when HEAD is detached."""
    return git("symbolic-ref", "--short", "-q", "HEAD", check=False) or None


def head_commit():
    return git("rev-parse", "HEAD")


def resolve_commit(ref):
    """The full hash of a commit (short hashes welcome), or a Refusal."""
    full = git("rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False)
    if not full:
        raise Refusal(f"{ref} is not a commit in this repository")
    return full


def changed_tracked_files():
    """Tracked paths that differ from HEAD (staged or not). Untracked and ignored files never count."""
    return [path for path in git("diff", "--name-only", "-z", "HEAD").split("\0") if path]


def commit_file(path, message):
    """Commit one tracked file as it is in the working tree; returns the new commit's hash."""
    args = ("commit", "-q", "--no-verify", "-m", message, "--", str(path))
    try:
        git(*args)
    except GitError as error:
        if "identity" not in str(error) and "tell me who you are" not in str(error):
            raise
        git("-c", "user.name=autoresearch", "-c", "user.email=autoresearch@localhost", *args)
    return head_commit()


def reset_hard(commit):
    """Move the branch and tracked files to `commit`. Untracked and ignored files are left as they are."""
    git("reset", "-q", "--hard", commit)


# ---------------------------------------------------------------------------
# Session and pending experiment (untracked, under runs/)


def load_session():
    """runs/session.json written by setup.py (tag, branch, prepare_sha256, ...), or None."""
    return read_json(SESSION_FILE)


def require_session():
    session = load_session()
    if session is None:
        raise Refusal("no research session here: run uv run scripts/setup.py first")
    return session


def load_pending():
    """runs/pending.json: the experiment awaiting a decision, or None."""
    return read_json(PENDING_FILE)


def boot_id():
    """Changes at every reboot (Linux), so a pid recorded before a reboot is not mistaken for a live one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_marker():
    """Who is running the experiment: enough to tell later whether that process still lives."""
    return {"pid": os.getpid(), "host": os.uname().nodename, "boot_id": boot_id()}


def pending_state(pending):
    """'running', 'interrupted' (its experiment.py died before finishing) or 'finished'."""
    if pending.get("state") == "finished":
        return "finished"
    same_machine = pending.get("host") == os.uname().nodename and pending.get("boot_id") == boot_id()
    if same_machine and pending.get("pid") and pid_alive(pending["pid"]):
        return "running"
    return "interrupted"


def pending_message(pending):
    """What the agent must do about a pending experiment, in one line."""
    number = pending["id"]
    state = pending_state(pending)
    if state == "running":
        return f"experiment {number} is still running (pid {pending['pid']}): wait for it"
    if state == "interrupted":
        return (f"experiment {number} was interrupted before it finished: "
                "run uv run scripts/decide.py discard (it is recorded as a crash)")
    return f"experiment {number} is pending a decision: run uv run scripts/decide.py keep|discard"


def next_run_number():
    """1 + the highest NNNN among runs/<NNNN>-<commit7>/ (interrupted runs keep their number)."""
    numbers = [int(path.name[:4]) for path in RUNS_DIR.glob("[0-9][0-9][0-9][0-9]-*")]
    return max(numbers, default=0) + 1


def base_commit(rows, session):
    """Where a discard or crash resets the branch: the last kept (or backtracked-to) commit,
    or the commit the session started from when nothing has been kept yet."""
    lineage = kept_lineage(rows)
    return resolve_commit(lineage[-1].commit if lineage else session["start_commit"])


def stop_reason(session=None, rows=None):
    """Why the session should stop now (deadline passed, max_experiments reached), or None."""
    session = session if session is not None else load_session()
    if not session:
        return None
    if session.get("deadline"):
        deadline = parse_iso(session["deadline"])
        if datetime.datetime.now(datetime.timezone.utc) >= deadline:
            return f"the session deadline {session['deadline']} has passed"
    if session.get("max_experiments"):
        done = len(experiments(rows if rows is not None else read_ledger()))
        if done >= session["max_experiments"]:
            return f"{done} experiments done, the session's max_experiments is {session['max_experiments']}"
    return None


def is_finite_number(value):
    return isinstance(value, (int, float)) and math.isfinite(value)
