"""Shared by every helper in scripts/ and by the hooks: paths, errors, JSON, the ledger, the keep
rule, the summary parser, triage, git, session files.

One source of truth for each path, file format and constant, so that setup, experiment, decide,
status, plot, the hooks and the headless loop can never disagree about them. Standard library
only, and cheap to import: the Stop and SessionStart hooks load it on every call. What runs
training and the referee (the sandbox, process groups, compute measurement, pins) is in
scripts/runner.py, which the helpers that train import next to this one.

Usage (from another script in scripts/ or from a hook):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # or the path to scripts/
    import common
    rows = common.read_ledger()
    best = common.best_kept(rows)
"""

import ast
import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

# ---------------------------------------------------------------------------
# Paths

ROOT = Path(__file__).resolve().parent.parent  # the repository this copy of scripts/ belongs to
SCRIPTS_DIR = ROOT / "scripts"
TRAIN_FILE = ROOT / "train.py"  # the one file the agent edits
PREPARE_FILE = ROOT / "prepare.py"  # the fixed protocol, pinned by hash at setup
TASK_FILE = ROOT / "autoresearch.toml"  # an external task's protocol (scripts/task.py), pinned at setup instead
LEDGER_FILE = ROOT / "results.tsv"
RUN_LOG = ROOT / "run.log"  # link to the latest run's log, so upstream's `grep "^val_bpb:" run.log` works
PROGRESS_PLOT = ROOT / "progress.png"
RUNS_DIR = ROOT / "runs"  # runs/<NNNN>-<commit7>/{run.log,summary.json,referee-*.log,out/}
OUT_DIR = "out"  # runs/<NNNN>-<commit7>/out/: the one folder training may write (model.pt2, model.json)
MODEL_FILE = "model.pt2"  # in each run's out/ folder; train.py writes it (and model.json) to AUTORESEARCH_EXPORT
SESSION_FILE = RUNS_DIR / "session.json"
PENDING_FILE = RUNS_DIR / "pending.json"
ARCHIVE_DIR = RUNS_DIR / "archive"  # earlier sessions, moved aside by setup
HELDOUT_FILE = RUNS_DIR / "heldout.json"  # test-split scores of each new best: for the human, never printed to the agent
NOTES_FILE = ROOT / "notes.md"
MEMORY_DIR = ROOT / ".claude" / "context" / "memory"
TEMPLATES_DIR = ROOT / "skills" / "ml-experiment-loop" / "templates"

PREPARE_COMMAND = "uv run prepare.py"
BRANCH_PREFIX = "autoresearch/"  # a session's branch is autoresearch/<tag>, as upstream names it
# prepare.py's DEFAULT_SEED, restated (importing prepare.py costs torch): train.py's seed without AUTORESEARCH_SEED
DEFAULT_SEED = 42
CPU_PROFILES = ("cpu", "golf-cpu")  # prepare.py's, restated: profiles whose budget is CPU seconds
PREPARE_COMMAND_OFFLINE = "uv run prepare.py --dataset builtin"


def profile_block_applies(condition, profile):
    """Whether train.py's `if <condition>:` block of settings is in effect under `profile`, for the
    two forms train.py uses: `PROFILE == "golf"` and `PROFILE in CPU_PROFILES`. The random proposer,
    the searcher and the trackers read the settings from the text, without running train.py."""
    condition = " ".join(condition.split())
    if condition == "PROFILE in CPU_PROFILES":
        return profile in CPU_PROFILES
    match = re.fullmatch(r"""PROFILE == ["']([\w-]+)["']""", condition)
    return bool(match) and match.group(1) == profile


def cache_dir():
    """The data cache root: $AUTORESEARCH_CACHE, default ~/.cache/autoresearch."""
    return Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")


def prepared_dir():
    """What training may read (read-only in the sandbox): manifest, tokenizer, token_bytes, train tokens."""
    return cache_dir() / "prepared"


def eval_dir():
    """What only the referee reads: the val and test rows (the training sandbox covers it with an empty tmpfs)."""
    return prepared_dir() / "eval"


EVAL_FILES = ("val_rows.npy", "test_rows.npy", "val_tokens.bin", "val_offsets.npy", "test_tokens.bin",
              "test_offsets.npy")  # in eval/; prepare.py writes them


def model_path(run_dir):
    """The model a run saved: runs/<NNNN>-<commit7>/out/model.pt2."""
    return Path(run_dir) / OUT_DIR / MODEL_FILE


def manifest_path():
    """prepare.py writes this file last, so its existence means the data is ready."""
    return prepared_dir() / "prepared.json"


def load_manifest():
    """The prepared-data manifest (profile, dataset, time_budget, ...), or None when not prepared."""
    try:
        return json.loads(manifest_path().read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise Refusal(f"{manifest_path()} is unreadable ({error}): run {PREPARE_COMMAND} again")


def budget_text(protocol):
    """The training budget of a manifest or session, as a reader says it: "524,288 tokens" on the
    cpu profiles, "300 s" on a time budget. (prepare.budget_text says it for train.py; the helpers
    and hooks do not import prepare, which loads numpy and is the referee's pinned code.)"""
    if protocol.get("train_tokens"):
        return f"{protocol['train_tokens']:,} tokens"
    return f"{protocol.get('time_budget')} s"


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


def write_bytes_atomic(path, data):
    """Write `data` to a temporary file beside `path`, fsync, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path, data):
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path):
    """A JSON file's content, or None when it does not exist. A symbolic link is refused, not followed:
    these are the files the helpers trust (session, pending, summaries)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise Refusal(f"{path} is a symbolic link or unreadable ({error.strerror}): the helpers write it "
                      "themselves; move it aside and retry") from None
    with os.fdopen(fd, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError as error:
        raise Refusal(f"{path} is not valid JSON ({error}); move it aside and retry")


def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def task_pin_problem(session, sha256=None):
    """Why an external session's task file (with this sha256, when already hashed) no longer matches
    its pin, as one line naming the way back; None when it matches."""
    if sha256 is None and TASK_FILE.is_file():
        sha256 = sha256_file(TASK_FILE)
    if sha256 is not None and sha256 == session.get("task_sha256"):
        return None
    start = session.get("start_commit", "HEAD")[:7]
    return (f"{TASK_FILE.name} no longer matches the hash pinned at setup: the task is fixed for the session; "
            f"restore it (git checkout {start} -- {TASK_FILE.name})")


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_iso(text):
    """An ISO-8601 time as an aware datetime; a time without zone is taken as local time."""
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.astimezone()


def read_tail(path, max_bytes=1 << 20):
    """The last `max_bytes` of a file as text: enough for the summary block or a traceback,
    cheap even when training printed 50 MB."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:  # a log the helper wrote, not a link
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - max_bytes))
        return f.read().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# The ledger: results.tsv, upstream-compatible, appended atomically under a lock

LEDGER_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")
# A parameter golf session's ledger (setup.py --golf), as the challenge's research loops keep it: the
# artifact's size in MB (10^6 bytes, as its 16 MB limit) where upstream has memory, and the
# hypothesis condensed to one line. A ledger's header says which of the two it is.
GOLF_LEDGER_COLUMNS = ("commit", "val_bpb", "artifact_mb", "status", "reasoning", "description")


def header_line(columns):
    return "\t".join(columns) + "\n"


LEDGER_HEADER = header_line(LEDGER_COLUMNS)
GOLF_LEDGER_HEADER = header_line(GOLF_LEDGER_COLUMNS)
# invalid: the referee caught the result (a model that looks ahead, or a number the saved model does
# not reproduce); like a crash it carries 0.000000 and 0.0, because no trusted number exists.
STATUSES = ("keep", "discard", "crash", "backtrack", "invalid")
NO_RESULT_STATUSES = ("crash", "invalid")
# constraint: an external task's run broke one of autoresearch.toml's constraints (scripts/task.py); it
# keeps its measured number, but is never kept. Only such a ledger has the status.
CONSTRAINT_STATUS = "constraint"
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{7,40}$")


class LedgerRow(NamedTuple):
    commit: str  # 7-character short hash, as upstream
    val_bpb: float  # 0.0 for a crash
    memory_gb: float  # peak VRAM in GB; 0.0 for a crash
    status: str  # one of STATUSES
    description: str
    artifact_mb: float = 0.0  # golf ledgers: code plus compressed model, MB of 10^6 bytes; 0.0 for a crash
    reasoning: str = ""  # golf ledgers: the experiment's hypothesis, one line
    extras: dict | None = None  # external tasks' ledgers: {column: value} of autoresearch.toml's columns


def one_line(text):
    """Tabs and newlines would break the format: spaces instead."""
    return " ".join(str(text).split())


def format_row(row, columns=LEDGER_COLUMNS):
    """One ledger line, in the five upstream columns, (columns=GOLF_LEDGER_COLUMNS) golf's six, or an
    external task's `commit <metric> <its columns> status description`."""
    head = f"{row.commit[:7]}\t{row.val_bpb:.6f}\t"
    if columns == GOLF_LEDGER_COLUMNS:
        return head + f"{row.artifact_mb:.6f}\t{row.status}\t{one_line(row.reasoning)}\t{one_line(row.description)}\n"
    if columns == LEDGER_COLUMNS:
        return head + f"{row.memory_gb:.1f}\t{row.status}\t{one_line(row.description)}\n"
    extras = row.extras or {}
    return head + "".join(f"{extras.get(name, 0.0):.6f}\t" for name in columns[2:-2]) + \
        f"{row.status}\t{one_line(row.description)}\n"


def parse_row(line, number, path=LEDGER_FILE, columns=LEDGER_COLUMNS):
    """A LedgerRow from one line; anything else is a Refusal naming the file and line number."""
    where = f"{Path(path).name} line {number}"
    fields = line.rstrip("\n").split("\t")
    if len(fields) != len(columns):
        raise Refusal(f"{where}: expected {len(columns)} tab-separated fields "
                      f"({' '.join(columns)}), found {len(fields)}: fix or remove that line")
    if columns not in (LEDGER_COLUMNS, GOLF_LEDGER_COLUMNS):
        return _parse_task_row(fields, where, columns)
    golf = columns == GOLF_LEDGER_COLUMNS
    commit, val_bpb, size, status = fields[:4]
    reasoning, description = (fields[4], fields[5]) if golf else ("", fields[4])
    if not COMMIT_PATTERN.match(commit):
        raise Refusal(f"{where}: {commit[:40]!r} is not a commit hash: fix or remove that line")
    if status not in STATUSES:
        raise Refusal(f"{where}: status {status[:20]!r} is not one of {', '.join(STATUSES)}")
    try:
        numbers = float(val_bpb), float(size)
    except ValueError:
        raise Refusal(f"{where}: val_bpb and {columns[2]} must be numbers, "
                      f"found {val_bpb[:20]!r} and {size[:20]!r}") from None
    if golf:
        return LedgerRow(commit, numbers[0], 0.0, status, description, numbers[1], reasoning)
    return LedgerRow(commit, numbers[0], numbers[1], status, description)


def _parse_task_row(fields, where, columns):
    """A row of an external task's ledger: commit, the metric, the task's columns, status, description."""
    commit, value, *extras, status, description = fields
    if not COMMIT_PATTERN.match(commit):
        raise Refusal(f"{where}: {commit[:40]!r} is not a commit hash: fix or remove that line")
    if status not in STATUSES + (CONSTRAINT_STATUS,):
        raise Refusal(f"{where}: status {status[:20]!r} is not one of {', '.join(STATUSES + (CONSTRAINT_STATUS,))}")
    try:
        numbers = [float(text) for text in [value, *extras]]
    except ValueError:
        raise Refusal(f"{where}: {', '.join(columns[1:-2])} must be numbers") from None
    return LedgerRow(commit, numbers[0], 0.0, status, description, extras=dict(zip(columns[2:-2], numbers[1:])))


def task_columns():
    """The ledger columns setup.py recorded for an external task (scripts/task.py), or None."""
    session = load_session() if SESSION_FILE.exists() else None
    columns = (session or {}).get("ledger_columns") if (session or {}).get("task") == "external" else None
    return tuple(columns) if columns else None


def ledger_columns(path=LEDGER_FILE):
    """The columns a ledger's header names (upstream's five when the file is missing or empty);
    a Refusal when its first line is neither header."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return columns_of_header(handle.readline(), path)
    except FileNotFoundError:
        return LEDGER_COLUMNS


def columns_of_header(header, path=LEDGER_FILE, external=None):
    """The columns of a ledger whose first line is `header` ("" for an empty file: upstream's five, or
    an external task's: this session's, or `external` for another checkout's ledger, a lane's)."""
    external = external or (task_columns() if path == LEDGER_FILE else None)
    if external and header in ("", header_line(external)):
        return external
    for columns, expected in ((LEDGER_COLUMNS, LEDGER_HEADER), (GOLF_LEDGER_COLUMNS, GOLF_LEDGER_HEADER)):
        if header in ("", expected):
            return columns
    raise Refusal(f"{Path(path).name} line 1: header is not {LEDGER_HEADER.strip()!r} nor "
                  f"{GOLF_LEDGER_HEADER.strip()!r} (tab-separated): not a ledger written by these helpers")


def read_ledger(path=LEDGER_FILE, external=None):
    """Every row of results.tsv in order ([] when the file does not exist yet); `external`: the
    columns of an external task's ledger that is not this session's (a lane's, read by lanes.py)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    columns = columns_of_header(lines[0] if lines else "", path, external)  # the file read once
    return [parse_row(line, number, path, columns) for number, line in enumerate(lines[1:], start=2)
            if line.strip()]


def _locked_append(path, text, header):
    """Append `text` with one write under an exclusive lock, then fsync; writes `header` first
    when the file is empty. Two processes appending at once give whole lines, never interleaved."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise Refusal(f"{path} is a symbolic link or not writable ({error.strerror}): the ledger is written "
                      "by the helpers only; move it aside") from None
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
    """Append `row` in the columns of the ledger's header (setup.py wrote it)."""
    columns = ledger_columns(path)
    _locked_append(path, format_row(row, columns), header_line(columns))


def ensure_ledger(path=LEDGER_FILE, columns=LEDGER_COLUMNS):
    """Create results.tsv with its header when missing (an existing ledger is left alone)."""
    _locked_append(path, "", header_line(columns))


def experiments(rows):
    """Rows that are experiments (a backtrack row records a rewind, not a run)."""
    return [row for row in rows if row.status != "backtrack"]


def scored(rows):
    """Experiments with a number worth drawing: kept or discarded. A crash or an invalid run records
    0.0 (it has no trusted result), and a constraint run broke a rule, so neither is a point."""
    return [row for row in rows if row.status in ("keep", "discard")]


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


def baseline_row(rows):
    """The session's first kept row: its baseline, or None before it is recorded."""
    return next((row for row in rows if row.status == "keep"), None)


def status_counts(rows):
    """{status: how many rows have it}, every status of STATUSES present (and `constraint` when a row has it)."""
    present = STATUSES + ((CONSTRAINT_STATUS,) if any(row.status == CONSTRAINT_STATUS for row in rows) else ())
    return {status: sum(row.status == status for row in rows) for status in present}


def metric_direction(session=None):
    """'lower' (val_bpb: the built-in protocol) or 'higher': the direction an external task's metric
    improves in, as setup.py recorded it from autoresearch.toml."""
    if session is None:
        session = load_session() if SESSION_FILE.exists() else None
    return ((session or {}).get("metric") or {}).get("direction", "lower")


def metric_name(session=None):
    """The decision metric's name: val_bpb, or an external task's."""
    if session is None:
        session = load_session() if SESSION_FILE.exists() else None
    return ((session or {}).get("metric") or {}).get("name", "val_bpb")


def best_of(rows, direction=None):
    """The row with the best value in the session's direction (the lowest val_bpb for the built-in task)."""
    if not rows:
        return None
    return (max if (direction or metric_direction()) == "higher" else min)(rows, key=lambda row: row.val_bpb)


def beats(value, other, direction=None):
    """Whether `value` is strictly better than `other` in the session's direction."""
    return value > other if (direction or metric_direction()) == "higher" else value < other


def best_kept(rows, direction=None):
    """The kept row with the best value (the lowest val_bpb) on the current lineage, or None before the baseline."""
    return best_of(kept_lineage(rows), direction)


def best_ever(rows, direction=None):
    """The kept row with the best value (the lowest val_bpb) of the whole session, or None."""
    return best_of([row for row in rows if row.status == "keep"], direction)


# ---------------------------------------------------------------------------
# Deciding: one rule, used by experiment.py (the verdict it prints) and decide.py (keep or refuse)
#
# Upstream keeps any lower val_bpb. With a run-to-run spread (noise) of s, a change that does
# nothing then "wins" about half the time, and a night of 100 such changes keeps about four
# (benchmarks/noise_simulation.py). Here one run must beat the best by KEEP_MARGIN_NOISE x s; a
# smaller win is "marginal" and is re-run once under a new seed, and the mean of the two runs
# must beat the best by KEEP_MARGIN_NOISE x s / sqrt(2) (the mean of n runs has 1/sqrt(n) of the
# noise, so the evidence asked for is the same). In simulated nights of 100 do-nothing changes,
# with s estimated from the baseline's 3 runs as setup does, that keeps 0.8 on average against
# upstream's 4.2, and still keeps about half of the real gains worth 2 s, 8 in 10 worth 3 s.

DEFAULT_NOISE_BPB = 0.001  # run-to-run spread of val_bpb assumed when the session has not measured it
MIN_NOISE_BPB = 1e-4  # floor: a spread measured as ~0 (deterministic fakes, identical seeds) would make every win "clear"
KEEP_MARGIN_NOISE = 3.0  # a single run must beat the best by this many noise units to be kept unconfirmed
KEEP_VERDICTS = ("baseline", "improved", "confirmed", "simpler")
NEVER_KEEP_VERDICTS = ("rerun", "cosmetic")  # no change to what is trained: a lower number is luck


def noise_band(session):
    """The session's measured noise (`noise_bpb` in session.json) when recorded, else the default."""
    noise = (session or {}).get("noise_bpb")
    return max(float(noise) if noise is not None else DEFAULT_NOISE_BPB, MIN_NOISE_BPB)


def noise_summary(session):
    """'0.001234 (measured: 3 runs of 1 commit)' or '0.001 (default: not measured)'."""
    samples = session.get("noise_runs") or []
    if session.get("noise_bpb") is None:
        return f"{noise_band(session):g} (default: not measured)"
    commits = len({sample["commit"] for sample in samples})
    return f"{session['noise_bpb']:.6f} (measured: {len(samples)} runs of {commits} commit{'s' * (commits > 1)})"


def pooled_noise(samples):
    """The standard deviation of val_bpb across seeds, from (commit, val_bpb) pairs: each commit's
    runs vary around their own mean, pooled over commits. None without two runs of one commit."""
    groups = {}
    for commit, value in samples:
        groups.setdefault(commit, []).append(value)
    squares = sum(sum((value - sum(values) / len(values)) ** 2 for value in values) for values in groups.values())
    freedom = sum(len(values) - 1 for values in groups.values())
    return math.sqrt(squares / freedom) if freedom else None


def keep_margin(runs):
    """Noise units by which the mean of `runs` runs must beat the best to be kept."""
    return KEEP_MARGIN_NOISE / math.sqrt(max(runs, 1))


# A diff line that only seeds, prints, logs or comments cannot make a model better.
OUTPUT_CALL = re.compile(r"^(print|(logging|logger|log|wandb|sys\.stdout|sys\.stderr)\..+)$")


def is_cosmetic_line(text):
    """A line that is blank, a comment, one print/logging call, one call of a seeding function, or
    one assignment to a seed. Part of a longer statement (it does not parse alone) counts as code."""
    try:
        body = ast.parse(text.strip()).body
    except SyntaxError:
        return False
    if not body:
        return True
    if len(body) != 1 or any(isinstance(node, ast.NamedExpr) for node in ast.walk(body[0])):
        return False
    statement = body[0]
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call):
        name = ast.unparse(statement.value.func)
        return bool(OUTPUT_CALL.match(name)) or "seed" in name.lower()
    if isinstance(statement, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        return all("seed" in ast.unparse(target).lower() for target in targets)
    return False


def classify_change(diff):
    """'none' (empty diff: a re-run), 'cosmetic' (every changed line is blank, a comment, or only
    seeds, prints or logs) or 'code'."""
    changed = [line[1:] for line in diff.splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    if not changed:
        return "none"
    return "cosmetic" if all(is_cosmetic_line(line) for line in changed) else "code"


def verdict(val_bpb, best_val_bpb, noise, lines, parent_lines, runs=1, change="code", direction="lower"):
    """The verdict on val_bpb (the mean of `runs` runs) against the best kept:

    baseline (nothing kept yet), rerun / cosmetic (the diff changes nothing that trains: never kept),
    improved (one run beats the best by KEEP_MARGIN_NOISE noise units), confirmed (the mean of
    several runs beats it by keep_margin(runs)), simpler (within the noise and train.py got shorter),
    marginal (one run beats the best by less: confirm it under a new seed), not confirmed, not improved.
    direction "higher" (an external task's metric) turns the comparison round: a gain is then a rise."""
    if best_val_bpb is None:
        return "baseline"
    if change == "none":
        return "rerun"
    if change == "cosmetic":
        return "cosmetic"
    delta = val_bpb - best_val_bpb if direction == "lower" else best_val_bpb - val_bpb
    if delta <= -keep_margin(runs) * noise:
        return "improved" if runs == 1 else "confirmed"
    if delta <= noise and lines < parent_lines:
        return "simpler"
    if delta < 0:
        return "marginal" if runs == 1 else "not confirmed"
    return "not improved"


def keep_allowed(val_bpb, best_val_bpb, noise, lines, parent_lines, runs=1, change="code"):
    return verdict(val_bpb, best_val_bpb, noise, lines, parent_lines, runs, change) in KEEP_VERDICTS


def noise_units(delta, noise):
    return delta / noise if noise else float("inf")


# ---------------------------------------------------------------------------
# train.py's summary block, and triage of runs that did not produce one

SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth")
SUMMARY_LINE = re.compile(r"^([A-Za-z_][\w.]*):\s*(.*?)\s*$")


def parse_number(text):
    """int, else float, else the text itself: a summary value as train.py printed it."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_summary(text):
    """The metrics of the last `---` block as a dict ({} when there is none, or it has neither val_bpb
    nor `evaluation: referee`, the line train.py prints instead when the sandbox hides the evaluation data).

    Numbers become int or float; extra `key: value` lines are kept as they are."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return {}
    metrics = {}
    for line in lines[starts[-1] + 1:]:
        match = SUMMARY_LINE.match(line.strip())
        if match:
            metrics[match.group(1)] = parse_number(match.group(2))
    return metrics if "val_bpb" in metrics or metrics.get("evaluation") == "referee" else {}


TRACEBACK_HEADER = "Traceback (most recent call last):"
# Searched for anywhere in a line: another process's last line, left without its newline, can
# come before it (Triton's nanobind leak report at a rank's exit does).
RANK_PREFIX = re.compile(r"\[rank(\d+)\]: ?")
ROOT_CAUSE = "Root Cause (first observed failure):"
ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")


def triage(log_tail, exit_code, timed_out, timeout_s=None):
    """Why a run produced no result: {'kind': ..., 'detail': one line, 'excerpt': a few lines}.

    kind is one of timeout, oom, fast_fail, exception, signal, no_summary; checked in that order
    because an out-of-memory error is also an exception, and a timeout ends in a signal."""
    lines = [line.rstrip() for line in log_tail.splitlines()]
    ranked = _failing_rank_lines(lines)
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
    if ranked and _exception_line(ranked):
        lines = ranked
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


def _failing_rank_lines(lines):
    """Under torchrun a rank's own output comes prefixed `[rankN]: `, and torchrun's ChildFailedError
    traceback follows it: the failing rank's exception is the one that says what went wrong. When one
    rank raises, the others fail after it in the collective it left (gloo: "Connection closed by
    peer"), so the lines are those of the rank torchrun names as the root cause, else of every rank."""
    ranked = [(match.group(1), line[match.end():]) for line in lines if (match := RANK_PREFIX.search(line))]
    root = None
    for number, line in enumerate(lines):
        if line.startswith(ROOT_CAUSE):
            root = next((match.group(1) for following in lines[number + 1:number + 8]
                         if (match := ROOT_CAUSE_RANK.match(following))), None)
    own = [text for rank, text in ranked if rank == root]
    return own if _exception_line(own) else [text for _, text in ranked]


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
# The training command and what guarded a run (scripts/runner.py runs it; status reads the guards too)


def training_command(option=None, gpus=1):
    """--train-command, else $AUTORESEARCH_TRAIN_COMMAND, else default_training_command(gpus)."""
    text = option or os.environ.get("AUTORESEARCH_TRAIN_COMMAND")
    return shlex.split(text) if text else default_training_command(gpus)


def session_gpus(session, manifest):
    """GPUs per training run of train.py in this session: what setup.py --gpus recorded, else the
    profile's (golf: 8, the challenge's; every other profile 1)."""
    return int((session or {}).get("gpus") or (manifest or {}).get("gpus", 1))


def default_training_command(gpus=1):
    """This Python running train.py; on several GPUs under torchrun (torch.distributed.run, from the
    same environment), one process per GPU, which train.py runs as DistributedDataParallel ranks."""
    if gpus == 1:
        return [sys.executable, "train.py"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "train.py"]


def is_default_training_command(command):
    """Whether `command` is default_training_command(N) for some N (what a verified result needs)."""
    command = list(command)
    match = re.fullmatch(r"--nproc_per_node=([1-9][0-9]*)", command[4]) if len(command) == 6 else None
    return command == default_training_command() or bool(match and command == default_training_command(int(match[1])))


def protections_off(guards):
    """The protections a run went without, as short words for the result line and status ([] when none)."""
    off = []
    if guards.get("task") == "external":
        off.append("self-reported (external task: no referee)")
    elif guards.get("referee") != "on":
        off.append("self-reported (referee off)")
    if guards.get("sandbox") != "on":
        off.append(f"sandbox {guards.get('sandbox', 'off').split(':')[0]}")
    elif not guards.get("eval_hidden") and guards.get("referee") == "on":
        off.append("eval data visible")
    if guards.get("shared"):
        off.append("sandbox shares paths")
    if guards.get("compute_measured") == "none":
        off.append("compute not measured (cluster job)")
    return off


# ---------------------------------------------------------------------------
# notes.md, the agent's lab notebook: read by memory.py and the hooks, written by the agent and the loop

NOTES_COMMENT = re.compile(r"<!--.*?-->", re.S)  # the template's guidance and examples: not notes
LOG_BLOCK = re.compile(r"^###\s+(REASONING|ANALYSIS)\b", re.M | re.I)  # an Experiment Log block: ### KIND: name


def strip_comments(text):
    """Markdown without its HTML comments."""
    return NOTES_COMMENT.sub("", text)


def log_block_heading(kind, name):
    """The heading of an Experiment Log block (kind REASONING or ANALYSIS), as LOG_BLOCK reads it."""
    return f"### {kind}: {name}"


def newest_hypothesis(path=NOTES_FILE, limit=200):
    """The hypothesis of the newest REASONING block in notes.md, on one line of at most `limit`
    characters (golf's `reasoning` column): its `- hypothesis:` item, else its first line of text,
    else its name; "" when there is none."""
    try:
        text = strip_comments(Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ""
    starts = [match for match in LOG_BLOCK.finditer(text) if match.group(1).upper() == "REASONING"]
    if not starts:
        return ""
    heading, _, body = text[starts[-1].start():].partition("\n")
    body = re.split(r"^#{1,3}\s", body, maxsplit=1, flags=re.M)[0]  # up to the next heading
    items = [line.strip().lstrip("-*").strip() for line in body.splitlines() if line.strip()]
    hypothesis = next((item.split(":", 1)[1] for item in items if item.lower().startswith("hypothesis:")), None)
    chosen = hypothesis if hypothesis is not None else (items[0] if items else heading.split(":", 1)[-1])
    return one_line(chosen)[:limit]


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
    return commit_files([path], message)


def commit_files(paths, message):
    """Commit tracked files as they are in the working tree; returns the new commit's hash."""
    args = ("commit", "-q", "--no-verify", "-m", message, "--", *map(str, paths))
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


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marker_alive(marker):
    """Whether the process a marker (process_marker()) names still runs, on this machine since this boot."""
    same_machine = marker.get("host") == os.uname().nodename and marker.get("boot_id") == boot_id()
    return bool(same_machine and marker.get("pid") and pid_alive(marker["pid"]))


def pending_state(pending):
    """'running', 'interrupted' (its experiment.py died before finishing) or 'finished'.
    A finished experiment whose confirmation run is under way is 'running' too."""
    if pending.get("state") == "finished":
        confirmation = pending.get("confirmation") or {}
        return "running" if confirmation.get("state") == "running" and _marker_alive(confirmation) else "finished"
    return "running" if _marker_alive(pending) else "interrupted"


def pending_message(pending):
    """What the agent must do about a pending experiment, in one line."""
    number = pending["id"]
    state = pending_state(pending)
    if state == "running":
        confirmation = pending.get("confirmation") or {}
        if confirmation.get("state") == "running":
            return f"experiment {number}'s confirmation run is still running (pid {confirmation['pid']}): wait for it"
        return f"experiment {number} is still running (pid {pending['pid']}): wait for it"
    if state == "interrupted":
        return (f"experiment {number} was interrupted before it finished: "
                "run uv run scripts/decide.py discard (it is recorded as a crash)")
    if pending.get("next") == CONFIRM_COMMAND:
        return (f"experiment {number} is a marginal win: confirm it under a new seed with {CONFIRM_COMMAND}, "
                "or run uv run scripts/decide.py discard")
    return f"experiment {number} is pending a decision: run uv run scripts/decide.py keep|discard"


CONFIRM_COMMAND = "uv run scripts/experiment.py --confirm"
KEEP_COMMAND = "uv run scripts/decide.py keep"
DISCARD_COMMAND = "uv run scripts/decide.py discard"


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
