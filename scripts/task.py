"""The task description: autoresearch.toml at the repository root says what one experiment is, so
the harness can research a training script of the researcher's own instead of this train.py.

With no autoresearch.toml the task is the built-in protocol (train.py against prepare.py, scored by
the referee) and nothing here is used: load() returns None, and every helper goes on as before.
With one, the helpers read the task instead:

    name = "parameter-golf"                   # a label for the session, the report and the plot
    editable = ["train_gpt.py"]               # the files the agent may edit; the first is the one the
                                              # random proposer perturbs (UPPER_CASE = number lines)
    command = "torchrun --standalone --nproc_per_node=8 train_gpt.py"   # or a list of words
    time_budget = 600                         # seconds of training the task allows (wall clock)
    timeout = 900                             # seconds after which the run is killed, whatever it does
    hidden = ["data/test.bin"]                # files only evaluation may read: hidden from the training
                                              # sandbox (globs, relative to the root); optional
    seed_env = "SEED"                         # the variable that carries each run's seed (optional;
                                              # AUTORESEARCH_SEED is always set too)

    [metric]                                  # the number that decides
    name = "val_bpb"
    pattern = 'val_bpb:(\\S+)'               # a regex with one group, searched in the run's log;
                                              # the last match counts
    direction = "lower"                       # or "higher"

    [[constraints]]                           # each read from the log; a run that breaks one (or
    name = "artifact_bytes"                   # prints no match) is `constraint`: never kept
    pattern = 'Total submission size int8\\+zlib: (\\d+) bytes'
    max = 15999999                            # and/or min; both inclusive

    [[columns]]                               # extra ledger columns, between the metric and status
    name = "artifact_mb"
    from = "artifact_bytes"                   # a constraint's name
    scale = 1e-6                              # the value written is the constraint's times this

The ledger of an external task is `commit <metric> <columns...> status description`. There is no
referee for an external task: the metric is the script's own (self-reported), and every result
line, the ledger's session, status and the report say so. setup.py pins this file's sha256, and
every experiment refuses once it changed.

Usage (from another script in scripts/):
    import task
    current = task.load()        # None: the built-in protocol; a Refusal names a bad field
    if current:
        value = current.read_metric(log_text)
"""

import fnmatch
import glob
import hashlib
import math
import re
import shlex
import tomllib
from pathlib import Path
from typing import NamedTuple

import common

DIRECTIONS = ("lower", "higher")
KNOWN_KEYS = {"name", "editable", "command", "time_budget", "timeout", "hidden", "seed_env", "metric",
              "constraints", "columns"}
# What the agent must never edit, whatever a task file says: the harness, its records, the task itself.
PROTECTED = ("autoresearch.toml", "prepare.py", "scripts/", ".claude/", ".codex/", ".agents/", ".opencode-plugin/",
             "skills/", "program.md", "results.tsv", "run.log", "runs/", ".git/", "tasks/")
# Ledger column names the helpers own, or that would make the ledger look like a built-in one.
RESERVED_COLUMNS = ("commit", "status", "description", "memory_gb", "reasoning")


class Constraint(NamedTuple):
    name: str
    pattern: re.Pattern
    max: float | None
    min: float | None

    def problem(self, value):
        """Why `value` (None: no line matched) breaks this constraint, in a few words, or None."""
        if value is None:
            return f"{self.name} not found in the log"
        if self.max is not None and value > self.max:
            return f"{self.name} {format_value(value)} over the max {format_value(self.max)}"
        if self.min is not None and value < self.min:
            return f"{self.name} {format_value(value)} under the min {format_value(self.min)}"
        return None


class Column(NamedTuple):
    name: str
    source: str  # a constraint's name
    scale: float


class Task(NamedTuple):
    name: str
    editable: tuple
    command: tuple
    time_budget: float
    timeout: float
    hidden: tuple
    seed_env: str | None
    metric_name: str
    metric_pattern: re.Pattern
    direction: str
    constraints: tuple
    columns: tuple
    sha256: str

    def ledger_columns(self):
        return ("commit", self.metric_name, *(column.name for column in self.columns), "status", "description")

    def read_metric(self, log_text):
        """The last number the metric's pattern matched in the log, or None."""
        return last_number(self.metric_pattern, log_text)

    def read_constraints(self, log_text):
        """{constraint name: its last number in the log, or None}."""
        return {constraint.name: last_number(constraint.pattern, log_text) for constraint in self.constraints}

    def violations(self, values):
        """The constraints `values` (read_constraints) break, as short phrases ([] when none)."""
        found = [constraint.problem(values.get(constraint.name)) for constraint in self.constraints]
        return [problem for problem in found if problem]

    def column_values(self, values):
        """{column name: the constraint's value times its scale (0.0 when it was not found)}."""
        return {column.name: values[column.source] * column.scale if values.get(column.source) is not None else 0.0
                for column in self.columns}

    def hidden_paths(self):
        """The hidden files and folders that exist now (globs expanded), as absolute paths."""
        found = set()
        for pattern in self.hidden:
            found.update(Path(path).resolve() for path in glob.glob(str(common.ROOT / pattern)))
        return sorted(found)

    def is_hidden(self, relative):
        return any(fnmatch.fnmatch(relative, pattern) or relative.startswith(pattern.rstrip("/") + "/")
                   for pattern in self.hidden)


def is_protected(relative):
    """Whether a repository path (posix, relative) is one the agent may never edit."""
    return any(relative == item.rstrip("/") or (item.endswith("/") and relative.startswith(item)) for item in PROTECTED)


def format_value(value):
    """A number read from a log, as a person reads it: 16,000,000 rather than 1.6e+07."""
    return f"{int(value):,}" if float(value).is_integer() and abs(value) < 1e18 else f"{value:g}"


def last_number(pattern, text):
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    try:
        value = float(matches[-1].group(1))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def load(path=None):
    """The task of this repository (a Task), or None when it has no autoresearch.toml (the built-in
    protocol). A file that is not a valid task is a common.Refusal naming the field."""
    path = Path(path or common.TASK_FILE)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise common.Refusal(f"{path.name} is unreadable ({error.strerror})") from None
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise common.Refusal(f"{path.name} is not valid TOML ({' '.join(str(error).split())})") from None
    return parse(table, hashlib.sha256(data).hexdigest(), path.name)


def parse(table, sha256="", where="autoresearch.toml"):
    """A Task from the TOML table; a Refusal for the first field that is missing or wrong."""
    def bad(field, problem):
        return common.Refusal(f"{where}: {field} {problem}")

    unknown = sorted(set(table) - KNOWN_KEYS)
    if unknown:
        raise bad(unknown[0], f"is not a field of a task (fields: {', '.join(sorted(KNOWN_KEYS))})")
    name = table.get("name", "external")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise bad("name", "must be a word (letters, digits, '.', '_' or '-')")
    editable = table.get("editable")
    if not isinstance(editable, list) or not editable or not all(isinstance(item, str) and item for item in editable):
        raise bad("editable", 'must be a non-empty list of file names, like ["train_gpt.py"]')
    for item in editable:
        normal = Path(item).as_posix()
        if Path(item).is_absolute() or ".." in Path(item).parts or any(char in item for char in "*?["):
            raise bad("editable", f"{item!r} must be a plain path inside the repository")
        if is_protected(normal):
            raise bad("editable", f"{item!r} is the harness's or its records', never the agent's")
    command = table.get("command")
    if isinstance(command, str):
        try:
            command = shlex.split(command)
        except ValueError as error:
            raise bad("command", f"cannot be split like a shell would ({error})") from None
    if not isinstance(command, list) or not command or not all(isinstance(word, str) for word in command):
        raise bad("command", 'must be a command line, as a string or a list of words')
    budget, timeout = table.get("time_budget"), table.get("timeout")
    for field, value in (("time_budget", budget), ("timeout", timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise bad(field, "must be a positive number of seconds")
    if timeout < budget:
        raise bad("timeout", f"({timeout:g} s) must be at least the time_budget ({budget:g} s)")
    hidden = table.get("hidden", [])
    if not isinstance(hidden, list) or not all(isinstance(item, str) and item for item in hidden):
        raise bad("hidden", "must be a list of paths (globs welcome), relative to the repository root")
    if any(Path(item).is_absolute() or ".." in Path(item).parts for item in hidden):
        raise bad("hidden", "paths must lie inside the repository")
    seed_env = table.get("seed_env")
    if seed_env is not None and not (isinstance(seed_env, str) and re.fullmatch(r"[A-Za-z_]\w*", seed_env)):
        raise bad("seed_env", "must be an environment variable's name")

    metric = table.get("metric")
    if not isinstance(metric, dict):
        raise bad("[metric]", "is missing: name, pattern and direction say how the result is read")
    metric_name = metric.get("name")
    if not isinstance(metric_name, str) or not re.fullmatch(r"[A-Za-z_]\w*", metric_name):
        raise bad("metric.name", "must be a word, like val_bpb")
    metric_pattern = compile_pattern(metric.get("pattern"), "metric.pattern", bad)
    direction = metric.get("direction", "lower")
    if direction not in DIRECTIONS:
        raise bad("metric.direction", 'must be "lower" or "higher"')
    if set(metric) - {"name", "pattern", "direction"}:
        raise bad("metric", "takes only name, pattern and direction")

    constraints = []
    for index, entry in enumerate(table.get("constraints", [])):
        field = f"constraints[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "pattern", "max", "min"}:
            raise bad(field, "takes name, pattern, and max and/or min")
        if not isinstance(entry.get("name"), str) or not re.fullmatch(r"[A-Za-z_]\w*", entry["name"]):
            raise bad(f"{field}.name", "must be a word, like artifact_bytes")
        limits = [entry.get(key) for key in ("max", "min")]
        if all(limit is None for limit in limits) or any(
                limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))) for limit in limits):
            raise bad(field, "needs a numeric max, min, or both")
        constraints.append(Constraint(entry["name"], compile_pattern(entry.get("pattern"), f"{field}.pattern", bad),
                                      entry.get("max"), entry.get("min")))
    names = [constraint.name for constraint in constraints]
    if len(set(names)) != len(names) or metric_name in names:
        raise bad("constraints", "names must differ from each other and from the metric's")

    columns = []
    for index, entry in enumerate(table.get("columns", [])):
        field = f"columns[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "from", "scale"}:
            raise bad(field, "takes name, from (a constraint's name) and scale")
        column_name, scale = entry.get("name"), entry.get("scale", 1)
        if not isinstance(column_name, str) or not re.fullmatch(r"[A-Za-z_]\w*", column_name):
            raise bad(f"{field}.name", "must be a word, like artifact_mb")
        if column_name in RESERVED_COLUMNS or column_name == metric_name:
            raise bad(f"{field}.name", f"{column_name!r} is taken (reserved: {', '.join(RESERVED_COLUMNS)}, the metric)")
        if entry.get("from") not in names:
            raise bad(f"{field}.from", f"must name one of the constraints ({', '.join(names) or 'there are none'})")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise bad(f"{field}.scale", "must be a number")
        columns.append(Column(column_name, entry["from"], float(scale)))
    if len({column.name for column in columns}) != len(columns):
        raise bad("columns", "names must differ")
    return Task(name, tuple(Path(item).as_posix() for item in editable), tuple(command), float(budget),
                float(timeout), tuple(hidden), seed_env, metric_name, metric_pattern, direction, tuple(constraints),
                tuple(columns), sha256)


def compile_pattern(text, field, bad):
    if not isinstance(text, str) or not text:
        raise bad(field, "must be a regular expression with one group, like 'val_bpb:(\\S+)'")
    try:
        pattern = re.compile(text, re.MULTILINE)
    except re.error as error:
        raise bad(field, f"is not a regular expression ({error})") from None
    if pattern.groups != 1:
        raise bad(field, f"must have exactly one group (the number), it has {pattern.groups}")
    return pattern


def require_unchanged(session):
    """The task of an external session, refused when autoresearch.toml changed since setup (or vanished)."""
    current = load()  # read and hashed once: what is checked is what runs
    problem = common.task_pin_problem(session, current.sha256 if current else None)
    if problem:
        raise common.Refusal(problem)
    return current


def session_task(session):
    """The pinned task of an external session (refused when its file changed), None for the built-in one."""
    return require_unchanged(session) if external(session) else None


def external(session):
    return (session or {}).get("task") == "external"
