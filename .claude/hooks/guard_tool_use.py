#!/usr/bin/env python3
"""PreToolUse guard: the rules of program.md that a machine can check, checked before each tool call.

Why a hook: an unattended agent breaks prose rules (it edits the referee, cats a 2 MB log into its
context, pushes, installs packages), and in `claude -p` runs of an untrusted workspace the
permission lists of .claude/settings.json may not apply, while hooks always run. Codex and the
OpenCode plugin call this same file with the same payload. Every refusal names what to use instead.

Why an allowlist that fails closed: a denylist of shell tricks is never complete (an interpreter,
an alias, a substitution, a symlink always remains). So Bash may run only
- the helpers, `uv run scripts/{setup,experiment,decide,status,plot,memory}.py`, with the flags
  program.md documents (flags that lower a protection, such as `decide.py --force` or
  `setup.py --no-referee`, are the human's), and `uv run prepare.py` to prepare data;
- read-only git: status, log, diff, show, branch --list (plus restoring train.py from git);
- a short list of read-only commands (ls, cat, head, tail, wc, grep, rg, sort, cut, find ...),
  within limits: no whole logs, no evaluation data, no secrets, no held-out scores;
joined by &&, ||, ; or |, with output redirected only to /dev/null or the memory files (setup,
experiment, decide and prepare alone and spelled exactly: only that form matches the
`excludedCommands` that let them out of Claude Code's Bash sandbox, which they need). Words
are split by the standard library's shlex; anything it cannot make simple ($(...), backticks,
variables, subshells, heredocs, environment prefixes) is refused, and so is any error here.
Edit, Write, MultiEdit, NotebookEdit and Codex's apply_patch may change only train.py and the
memory files (notes.md, REPORT.md, .claude/context/memory/*.md); Read, Grep and Glob may not
read evaluation data, held-out scores, secrets or whole logs. With an autoresearch.toml at the root
(an external task, scripts/task.py) the task's editable files take train.py's place, and its
`hidden` files are refused to reading like the evaluation data; the task file itself is protected. The memory protocol is checked too:
`experiment.py` needs a newest Experiment Log block of kind REASONING, `decide.py keep|discard`
one of kind ANALYSIS (the baseline is exempt).

Output: nothing and exit 0 = allowed; a refusal is Claude Code's JSON "deny" decision on stdout
and the same one-line reason on stderr with exit 2, so clients that read only the exit code block
too. A maintainer working on the harness (not a research session) starts the client with
AUTORESEARCH_MAINTAINER=1 to switch the guard off; the agent cannot set its client's environment.
AUTORESEARCH_ALLOW_INSTALL=1 (set by `scripts/loop.py --allow-install`) allows `uv pip install`.

Usage: python3 .claude/hooks/guard_tool_use.py < payload.json
"""

import fnmatch
import glob
import itertools
import json
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from research_state import StateUnavailable, load_common, newest_log_block, project_root, read_state  # noqa: E402

MAX_LOG_LINES = 50  # enough to see a traceback's end; a full run.log is thousands of lines
MAX_CAT_BYTES = 200_000  # train.py is ~25 KB; anything larger is read in parts
MAX_COMMAND_CHARS = 10_000

EDITABLE = ("train.py", "notes.md", "REPORT.md")  # train.py: the built-in task's; an external task names its own
EDITABLE_FOLDER = ".claude/context/memory"
HELD_OUT_FILES = ("heldout.json", "referee-test*.log")  # runs/heldout.json, runs/N/referee-test.log
SECRET_PATTERNS = (
    re.compile(r"(^|/|~)\.ssh(/|$)"), re.compile(r"(^|/|~)\.aws(/|$)"), re.compile(r"(^|/)\.netrc$"),
    re.compile(r"(^|/)\.git-credentials$"), re.compile(r"(^|/)\.env(\.[\w.-]+)?$"),
    re.compile(r"(^|/)\.config/gh(/|$)"), re.compile(r"(^|/|~)\.gnupg(/|$)"),
    re.compile(r"(^|/)(\.credentials|auth|\.claude)\.json$"), re.compile(r"(^|/)\.(pypirc|npmrc|docker|kube)(/|$)"),
    re.compile(r"^/proc/.*/environ$"),  # the client's API keys
)

HELPERS = "`uv run scripts/status.py`, `experiment.py`, `decide.py`, `memory.py search`"
REASON_LOG = (
    "Do not read whole logs into your context: use `uv run scripts/status.py`, "
    "`grep '^val_bpb:' run.log`, or `tail -n 50 run.log` (at most 50 lines)."
)
REASON_READ_LOG = (
    "Do not read whole logs into your context: Read it with offset and a limit of at most 50 "
    "lines, or use `grep '^val_bpb:' run.log` / `tail -n 50 run.log`."
)
REASON_PUSH = "git push is not allowed: nothing leaves this machine; the human reviews and pushes the branch."
REASON_ADD_LEDGER = (
    "results.tsv, logs, runs/ and notes.md are never committed (a reset must not erase them): "
    "`uv run scripts/decide.py keep|discard` records ledger rows."
)
REASON_COMMIT = 'Do not commit by hand: `uv run scripts/experiment.py "DESCRIPTION"` commits train.py and runs it.'
REASON_RESET = (
    "Do not move history by hand: `uv run scripts/decide.py discard` resets to the best kept commit, "
    "`uv run scripts/decide.py backtrack [COMMIT]` rewinds further and records it."
)
REASON_CLEAN = "git clean would delete the untracked ledger, logs and notes; no experiment needs it."
REASON_GIT = (
    "Only read-only git runs here (git status, log, diff, show, branch --list, or `git checkout -- train.py`), "
    "with no -c, -C, aliases, --output, --ext-diff or --no-index: the helpers commit, reset and rewind."
)
REASON_TRAIN = (
    'Run experiments through the helper: `uv run scripts/experiment.py "DESCRIPTION"` '
    "(it commits train.py, enforces the time limit, logs to a file and compares with the best)."
)
REASON_CODE = (
    "Do not run code outside the experiment (interpreters, shells, eval): put the idea into train.py "
    'and run `uv run scripts/experiment.py "DESCRIPTION"`; a hook already checks that train.py parses.'
)
REASON_INSTALL = (
    "No new packages: experiments use exactly what pyproject.toml pins; "
    "write the idea in plain PyTorch inside train.py."
)
REASON_NETWORK = (
    "No network access during research: the data is prepared and everything an experiment needs "
    "is local (`uv run scripts/status.py` for where things stand)."
)
REASON_SECRET = "Secrets (~/.ssh, ~/.aws, .env, credentials) are off limits to the research agent."
REASON_HELD_OUT = (
    "The held-out test split is for the human's morning check, never for decisions: "
    "judge by val_bpb with `uv run scripts/status.py`."
)
REASON_EVAL = (
    "The evaluation data (the cache's prepared/eval, *_rows.npy, val/test tokens) is the referee's alone: "
    "train on the train split and judge by `uv run scripts/status.py`."
)
REASON_NEED_REASONING = (
    "Write this experiment's REASONING block in notes.md first (### REASONING: NAME, with "
    "hypothesis, evidence, risk, under ## Experiment Log), then run `uv run scripts/experiment.py \"DESCRIPTION\"`."
)
REASON_NEED_ANALYSIS = (
    "Write the ANALYSIS block in notes.md first (### ANALYSIS: NAME, with result, vs expected, why, "
    "lesson), then run `uv run scripts/decide.py keep|discard`."
)
REASON_UNPARSED = "Could not parse this shell command (unbalanced quotes?): split it into simpler commands."
REASON_EXPANSION = (
    "No substitutions, variables, backticks or brace expansion ($(...), `...`, $VAR, {a,b}): "
    "write the command out literally, e.g. `grep '^val_bpb:' run.log`."
)
REASON_COMPLEX = (
    "Only simple commands joined by &&, ||, ; or | run here (no subshells, background jobs, heredocs, "
    "process substitution): split it into separate calls, and change files with the Edit tool."
)
REASON_ENV = (
    "Environment prefixes (NAME=value command) are the human's: run the command as program.md shows it, "
    'e.g. `uv run scripts/experiment.py "DESCRIPTION"`.'
)
REASON_CD = "Stay in the project root: run the command without `cd` (give paths relative to the project)."
REASON_REDIRECT = (
    "Output may go only to /dev/null or a memory file (notes.md, .claude/context/memory/*.md): change "
    "files with the Edit tool; the helpers write logs and the ledger."
)
REASON_LONG = "This command is too long to check: split it into simpler calls."
REASON_CRASH = "The guard could not check this call ({error}) and refuses what it cannot check: use a simpler call."
REASON_FOLLOW = "tail -f / --follow never returns: use `tail -n 50 run.log` once, or `uv run scripts/status.py`."

# The flags of each helper that the agent may pass (name -> takes a value), from program.md and the skills.
HELPER_FLAGS = {
    "setup.py": {"--tag": True, "--deadline": True, "--max-experiments": True, "--noise-runs": True,
                 "--measure-noise": False},
    "experiment.py": {"--confirm": False},
    "decide.py": {"--reason": True},
    "status.py": {"--json": False},
    "plot.py": {},
    "memory.py": {"--limit": True},
    "prepare.py": {"--dataset": True, "--num-shards": True, "--profile": True, "--workers": True,
                   "--retries": True, "--backoff": True},
}
# Flags that lower a protection: the human passes them, the agent never does.
HUMAN_FLAGS = {
    "--force": "decide.py refuses to keep a result that is worse than the best, unverified or invalid: "
               "`uv run scripts/decide.py discard` it",
    "--no-referee": "every result is re-scored by the referee",
    "--no-sandbox": "training always runs in the sandbox",
    "--train-command": "experiment.py always trains train.py",
    "--timeout": "experiment.py enforces the protocol's time limit itself",
    "--seed": "experiment.py picks the seeds (a seed chosen until one wins is luck, not a result)",
    "--output": "plot.py writes progress.png where the report expects it",
    "--time-budget": "the protocol's budget is fixed by the profile",
    "--eval-tokens": "the protocol's evaluation size is fixed by the profile",
    "--base-url": "the data comes from the configured source",
}
PACKAGE_MANAGERS = re.compile(r"^(pip|pip3|pip3\.\d+|pipx|uvx|conda|mamba|micromamba|apt|apt-get|dpkg|npm|npx|yarn|"
                              r"pnpm|poetry|cargo|gem|brew|easy_install)$")
INTERPRETERS = re.compile(r"^(python|python3|python3\.\d+|pypy3?|perl|ruby|node|nodejs|deno|bun|lua|php|Rscript|"
                          r"julia|tclsh|awk|gawk|mawk|bash|sh|zsh|dash|ksh|fish|eval|source|\.|torchrun|accelerate|"
                          r"jupyter|ipython|make|man|script)$")
NETWORK_TOOLS = {"curl", "wget", "aria2c", "http", "https", "httpie", "xh", "ssh", "scp", "sftp", "ftp", "rsync",
                 "nc", "ncat", "netcat", "telnet", "socat", "gh", "huggingface-cli", "hf"}
FILE_WRITERS = {"cp", "mv", "rm", "ln", "truncate", "install", "touch", "chmod", "chown", "rmdir", "unlink", "shred",
                "tee", "dd", "sed", "mkdir", "patch", "split", "tar", "unzip", "zip", "gzip", "gunzip"}
STANDALONE = {"setup.py", "experiment.py", "decide.py", "prepare.py"}  # in .claude/settings.json excludedCommands
PROTECTED_NAMES = {"STOP", "runs", "results.tsv", "run.log", "prepare.py", "scripts", ".claude", "skills", "program.md",
                   "autoresearch.toml"}
EDITORS = {"vim", "vi", "nano", "emacs", "ed", "ex", "less", "more", "view", "pico", "joe", "micro"}
GIT_NETWORK = {"fetch", "pull", "clone", "ls-remote", "remote", "submodule", "request-pull", "send-email", "daemon"}
GIT_HISTORY = {"commit": REASON_COMMIT, "reset": REASON_RESET, "rebase": REASON_RESET, "merge": REASON_RESET,
               "cherry-pick": REASON_RESET, "revert": REASON_RESET, "clean": REASON_CLEAN, "switch": REASON_RESET,
               "filter-branch": REASON_RESET, "update-ref": REASON_RESET, "stash": REASON_RESET, "am": REASON_RESET,
               "apply": REASON_RESET, "tag": REASON_RESET, "worktree": REASON_RESET, "config": REASON_GIT}
GIT_NEVER_ADD = ("results.tsv", "run.log", "runs", "notes.md", ".claude/context/memory")
GIT_READ = {"status", "log", "diff", "show", "branch"}
GIT_UNSAFE_OPTIONS = ("--output", "--ext-diff", "--textconv", "--no-index", "--open-files-in-pager", "--exec-path",
                      "--upload-pack", "--receive-pack", "--config-env", "--git-dir", "--work-tree")
GIT_BRANCH_LIST = {"--list", "-l", "-a", "--all", "-r", "--remotes", "-v", "-vv", "--verbose", "--show-current",
                   "--no-color", "--color", "--merged", "--no-merged", "--contains", "--sort"}
# Read-only commands: program -> (flags without a value, flags with a value). Operands are files,
# except where a rule below says otherwise.
READERS = {
    "cat": ("-n -b -s -A -v -E -T -e -t --number", ""),
    "head": ("-q -v --quiet --verbose", "-n -c --lines --bytes"),
    "tail": ("-q -v --quiet --verbose", "-n -c --lines --bytes"),
    "wc": ("-l -c -w -m -L --lines --bytes --words --chars", ""),
    "grep": ("-E -F -G -P -i -y -v -w -x -c -l -L -n -h -H -o -q -s -r -R -a -I -z -Z -b --color --colour "
             "--count --ignore-case --invert-match --word-regexp --line-number --recursive --no-filename "
             "--with-filename --only-matching --quiet --silent --fixed-strings --extended-regexp "
             "--files-with-matches --files-without-match --binary-files=without-match",
             "-e -f -m -A -B -C --regexp --max-count --include --exclude --exclude-dir --context "
             "--after-context --before-context --color --colour"),
    "rg": ("-i -S -s -w -x -v -n -N -l -c -o -F -u -uu --hidden --no-ignore --files --count --ignore-case "
           "--smart-case --case-sensitive --word-regexp --line-number --no-line-number --files-with-matches "
           "--only-matching --fixed-strings --invert-match --no-heading --heading --color",
           "-e -g -t -T -m -A -B -C --glob --type --type-not --max-count --context --after-context "
           "--before-context --regexp --color --max-depth"),
    "sort": ("-n -r -u -g -h -V -s -f -b -M --numeric-sort --reverse --unique --general-numeric-sort "
             "--human-numeric-sort --version-sort --stable --ignore-case", "-k -t --key --field-separator"),
    "uniq": ("-c -d -u -i --count --repeated --unique --ignore-case", "-f -s -w"),
    "cut": ("-s --complement --only-delimited", "-d -f -c -b --delimiter --fields --characters --bytes"),
    "ls": ("-l -a -A -h -t -r -S -1 -d -R -F -G -i -s --all --human-readable --color", "--color --sort"),
    "find": ("", ""),  # its own rule: primaries, not flags
    "sed": ("-n --quiet --silent", ""),  # `sed -n 'N,Mp' FILE` only
    "echo": ("", ""), "printf": ("", ""), "pwd": ("", ""), "true": ("", ""), "false": ("", ""),
    "date": ("-u -R -I --utc --iso-8601", ""), "nproc": ("", ""), "uptime": ("", ""), "free": ("-h -m -g", ""),
    "df": ("-h", ""), "du": ("-s -h -a -c --summarize --human-readable", "-d --max-depth"),
    "uname": ("-a -m -r -s", ""), "whoami": ("", ""), "which": ("", ""), "sleep": ("", ""),
    "nvidia-smi": ("-L -q --list-gpus --query", "--query-gpu --format -i --id"),
}
WRAPPERS = {"sudo", "doas", "env", "timeout", "nice", "ionice", "nohup", "stdbuf", "xargs", "time", "command",
            "builtin", "exec", "parallel", "watch"}
ANY_TEXT = {"echo", "printf", "which", "sleep"}  # operands are text, not files
SEPARATORS = {"&&", "||", ";", "|"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "&>>", ">|"}
HARMLESS_REDIRECTS = re.compile(r"(?<=\s)(\d?>&\d|\d?>>?\s*/dev/null|&>>?\s*/dev/null)(?=\s|$|[;&|])")
SAFE_TOOLS = {"TodoWrite", "Skill", "Task", "Agent", "ExitPlanMode", "BashOutput", "KillShell", "KillBash",
              "SlashCommand", "update_plan", "todowrite", "todoread"}  # no file or process access of their own
MATCH_ALL = {"", ".", ".*", "^", "$", "^.*", "^.*$", "^"}


def install_allowed():
    """scripts/loop.py --allow-install sets this for its agent, and records what gets installed."""
    return os.environ.get("AUTORESEARCH_ALLOW_INSTALL") == "1"


class Blocked(Exception):
    """Raised with the one-line reason when a tool call breaks a rule."""


class Context:
    """What every rule needs: the project root, the tool's cwd, and the cache's evaluation folder."""

    def __init__(self, root, cwd):
        self.root, self.cwd = root, cwd
        common = load_common(root)  # one copy of the cache layout: the helpers' own
        self.eval_dir = os.path.realpath(str(common.eval_dir()))
        self.eval_files = tuple(common.EVAL_FILES)
        self.task = load_task(root)  # None: the built-in task
        self.editable = (*self.task.editable, *EDITABLE[1:]) if self.task else EDITABLE


def load_task(root):
    """The project's external task (scripts/task.py reading autoresearch.toml), or None. A malformed
    task file raises, and the guard then refuses every call it cannot check."""
    if not os.path.exists(os.path.join(root, "autoresearch.toml")):
        return None
    scripts = os.path.join(root, "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import task  # the helpers' own reader: one definition of the format

    return task.load()


# ---------------------------------------------------------------------------------------------
# Paths


def resolve(path, ctx):
    """`path` as an absolute, normalised, symlink-free path (~ expanded, relative to the tool's cwd)."""
    return os.path.realpath(os.path.join(ctx.cwd, os.path.expanduser(str(path))))


def relative_to_project(real, root):
    """`real` relative to the project root, or None when it lies outside the project."""
    if real != root and not real.startswith(root + os.sep):
        return None
    return os.path.relpath(real, root).replace(os.sep, "/")


def within(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_editable(relative, ctx):
    if relative in ctx.editable:
        return True
    folder, name = os.path.split(relative)
    return folder == EDITABLE_FOLDER and name.endswith(".md")


def edit_reason(relative, ctx):
    """Why `relative` (a project path, or an outside path) may not be changed, naming what to do instead."""
    if relative == "STOP":
        return "Only the human ends the session by creating STOP: keep experimenting (see program.md, Never stop)."
    if relative == "prepare.py":
        what = "prepare.py is the fixed protocol (the referee of every result)"
    elif relative in ("results.tsv", "results.tsv.example", "runs", "run.log") or relative.startswith("runs/"):
        what = f"{relative} is written by the helpers (`uv run scripts/decide.py keep|discard`)"
    elif relative.startswith(("scripts/", ".claude/", "skills/", ".claude-plugin/", ".codex/", ".opencode/",
                              ".agents/", ".git/")) or relative in ("program.md", "CLAUDE.md", "AGENTS.md",
                                                                    "autoresearch.toml"):
        what = f"{relative} belongs to the research org, which the human owns"
    elif relative.startswith("/"):
        what = f"{relative} lies outside the project"
    else:
        what = f"{relative} is not part of the experiment"
    return (f"Only {', '.join(ctx.editable[:-2])} and the memory files (notes.md, .claude/context/memory/*.md, "
            f"REPORT.md) may be edited: {what}.")


def check_edit(path, ctx):
    """Refuse a change of `path` unless it is train.py or a memory file (after following symlinks)."""
    if not isinstance(path, str) or not path:
        raise Blocked("This edit names no file: give the file_path of train.py or a memory file.")
    if is_secret(path):
        raise Blocked(REASON_SECRET)
    real = resolve(path, ctx)
    relative = relative_to_project(real, ctx.root)
    if relative is None or not is_editable(relative, ctx):
        raise Blocked(edit_reason(relative or real, ctx))


def is_log(path):
    return re.search(r"\.log(\.\d+)?$", os.path.basename(str(path)).lower()) is not None


def is_held_out(path):
    """The held-out test scores: seeing them would turn the test split into a second val split."""
    return any(fnmatch.fnmatch(os.path.basename(str(path)), pattern) for pattern in HELD_OUT_FILES)


def is_secret(path):
    return any(pattern.search(str(path).replace(os.sep, "/")) for pattern in SECRET_PATTERNS)


def check_read(path, ctx, whole=False):
    """Refuse reading `path` (a file, folder or glob) if it is a secret, held-out scores or evaluation
    data; with `whole`, also a whole log. Globs are checked as written and as the shell expands them."""
    path = str(path)
    candidates = [path]
    if any(char in path for char in "*?["):
        candidates += itertools.islice(glob.iglob(os.path.join(ctx.cwd, os.path.expanduser(path))), 1000)
    for candidate in candidates:
        real = resolve(candidate, ctx)
        names = (os.path.basename(candidate), os.path.basename(real))
        if is_secret(candidate) or is_secret(real):
            raise Blocked(REASON_SECRET)
        if any(is_held_out(name) for name in names):
            raise Blocked(REASON_HELD_OUT)
        if within(real, ctx.eval_dir) or any(name in ctx.eval_files or fnmatch.fnmatch(name, "*_rows.npy")
                                             for name in names):
            raise Blocked(REASON_EVAL)
        relative = relative_to_project(real, ctx.root)
        if ctx.task and relative and ctx.task.is_hidden(relative):
            raise Blocked(f"{relative} is evaluation data of this task (autoresearch.toml's hidden): only evaluation "
                          "reads it; judge by `uv run scripts/status.py`.")
        if whole and any(is_log(name) for name in names):
            raise Blocked(REASON_LOG)


def check_search_root(path, ctx, content=False):
    """A recursive search (grep -r, rg, find, the Grep and Glob tools) must not cover the eval data;
    one that prints file contents must not cover held-out scores either."""
    check_read(path, ctx)
    real = resolve(path, ctx)
    if within(ctx.eval_dir, real):
        raise Blocked(REASON_EVAL)
    runs = os.path.join(ctx.root, "runs")
    if content and (within(runs, real) or within(real, runs)) and any(
            is_held_out(name) for _, _, names in itertools.islice(os.walk(runs), 5000) for name in names):
        raise Blocked(REASON_HELD_OUT + " Search the run logs by name instead: `grep '^val_bpb:' runs/*/run.log`.")


# ---------------------------------------------------------------------------------------------
# Shell: split with shlex into simple commands, refuse whatever is not simple


def unquoted(command, double=True):
    """The characters of `command` that the shell sees outside single quotes (with `double`, double-quoted
    ones too, since $ and backticks expand there), with escaped characters left out."""
    seen, quote, escaped = [], None, False
    for char in command:
        if escaped:
            escaped = False
        elif quote == "'":
            quote = None if char == "'" else quote
        elif char == "\\":
            escaped = True
        elif quote == '"':
            quote = None if char == '"' else quote
            seen.append(char if double else "")
        elif char in "'\"":
            quote = char
        else:
            seen.append(char)
    return "".join(seen)


def simple_commands(command):
    """[(argv, [(operator, target)])] for the simple commands of `command`, or Blocked."""
    if len(command) > MAX_COMMAND_CHARS:
        raise Blocked(REASON_LONG)
    command = command.replace("$'\\t'", "'\t'")  # sort -t$'\t', as the research-report skill shows
    command = command.replace("\\\n", "")  # a line continuation, as bash reads it
    bare = unquoted(command)
    if any(char in bare for char in "$`"):
        raise Blocked(REASON_EXPANSION)
    if "{" in bare or "}" in bare:
        raise Blocked(REASON_EXPANSION)
    command = HARMLESS_REDIRECTS.sub(" ", " " + command)
    lexer = shlex.shlex(command, posix=True, punctuation_chars="();<>|&\n")
    lexer.whitespace, lexer.whitespace_split, lexer.commenters = " \t\r", True, ""
    try:
        tokens = list(lexer)
    except ValueError as error:
        raise Blocked(REASON_UNPARSED) from error
    commands, argv, redirects, index, joined = [], [], [], 0, False
    while index < len(tokens):
        token = tokens[index]
        if token and set(token) <= set(";\n") and not argv and not redirects:
            pass  # an empty line, or a trailing `;`
        elif token in SEPARATORS or (token and set(token) <= set(";\n")):
            if not argv:
                raise Blocked(REASON_COMPLEX)
            commands.append((argv, redirects))
            argv, redirects, joined = [], [], token in ("|", "&&", "||")
        elif token in REDIRECTS:
            if index + 1 >= len(tokens) or tokens[index + 1] in REDIRECTS | SEPARATORS:
                raise Blocked(REASON_COMPLEX)
            if argv and argv[-1] in ("0", "1", "2"):
                argv.pop()  # the fd number of `2>`
            redirects.append((token, tokens[index + 1]))
            index += 1
        elif token and set(token) <= set("();<>|&\n"):
            raise Blocked(REASON_COMPLEX)
        else:
            argv.append(token)
            joined = False
        index += 1
    if argv:
        commands.append((argv, redirects))
    elif redirects or joined or not commands:
        raise Blocked(REASON_COMPLEX)  # `ls |` or `> file` alone
    return commands


def check_redirect(operator, target, ctx):
    if target in ("/dev/null", "/dev/stdout", "/dev/stderr"):
        return
    if operator == "<":
        check_read(target, ctx, whole=True)
        return
    if operator == ">&" and target.isdigit():
        return
    real = resolve(target, ctx)
    relative = relative_to_project(real, ctx.root)
    if relative is None or not is_editable(relative, ctx):
        raise Blocked(edit_reason(relative, ctx) if relative and not is_editable(relative, ctx) else REASON_REDIRECT)


def parse_options(args, flags, valued):
    """(options [(name, value)], operands) for a command whose flags are listed in `flags` (no value)
    and `valued` (one value); an unknown flag raises Blocked."""
    options, operands, index = [], [], 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            operands += args[index + 1:]
            break
        if arg.startswith("--"):
            name, equals, value = arg.partition("=")
            if name in valued:
                if not equals:
                    index += 1
                    value = args[index] if index < len(args) else None
                options.append((name, value))
            elif arg in flags or name in flags:
                options.append((name, value if equals else None))
            else:
                raise Blocked(unknown_flag(name))
        elif arg.startswith("-") and len(arg) > 1:
            for position in range(1, len(arg)):
                name = "-" + arg[position]
                if name in valued:
                    value = arg[position + 1:]
                    if not value:
                        index += 1
                        value = args[index] if index < len(args) else None
                    options.append((name, value))
                    break
                if name not in flags:
                    raise Blocked(unknown_flag(arg))
                options.append((name, None))
        else:
            operands.append(arg)
        index += 1
    if any(value is None for name, value in options if name in valued):
        raise Blocked(REASON_UNPARSED)
    return options, operands


def unknown_flag(flag):
    for human, why in HUMAN_FLAGS.items():
        if len(flag) > 3 and human.startswith(flag.split("=")[0]):  # argparse accepts abbreviations
            return f"`{human}` is the human's, not the agent's ({why})."
    return f"`{flag}` is not an option this session uses: see program.md for the commands and their flags."


def count_value(value):
    """A head/tail count: (number, from_start) for `N` or `+N`; refuses anything else, however long."""
    match = re.fullmatch(r"(\+?)(\d{1,9})", str(value))
    if not match:
        raise Blocked(f"`{str(value)[:20]}` is not a line count: use `tail -n 50 run.log`.")
    return int(match.group(2)), bool(match.group(1))


# ---------------------------------------------------------------------------------------------
# Rules for one simple command


def check_simple(argv, ctx):
    program, args = argv[0], argv[1:]
    if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", program):
        raise Blocked(REASON_ENV)
    name = os.path.basename(program)
    if program == "uv":  # found on PATH, not a `uv` the agent placed somewhere
        return check_uv(args, ctx)
    if name == "git" and program == "git":
        return check_git(args, ctx)
    if name == "cd":
        raise Blocked(REASON_CD)
    if name == "train.py":
        raise Blocked(REASON_TRAIN)
    if name in WRAPPERS:
        check_wrapped(args, ctx)
    if name in EDITORS:
        if any(is_log(arg) for arg in args):
            raise Blocked(REASON_LOG)
        raise Blocked("Change files with the Edit tool (only train.py and the memory files), read them with Read.")
    if INTERPRETERS.match(name) or name.startswith("python"):
        if any(os.path.basename(arg) == "train.py" for arg in args[:3]):
            raise Blocked(REASON_TRAIN)
        if any(arg in ("pip", "pip3", "ensurepip") for arg in args[:3]):
            raise Blocked(REASON_INSTALL)
        raise Blocked(REASON_CODE)
    if PACKAGE_MANAGERS.match(name):
        if install_allowed() and name.startswith("pip") and args[:1] == ["install"]:
            return None
        raise Blocked(REASON_INSTALL)
    if name in NETWORK_TOOLS:
        raise Blocked(REASON_NETWORK)
    in_place = any(re.match(r"^(-[a-zA-Z]*i|--in-place)", arg) for arg in args)
    if name in FILE_WRITERS and (name != "sed" or in_place):
        for target in args:  # name the protected file it would change, when there is one
            real = resolve(target.split("=")[-1], ctx)
            relative = relative_to_project(real, ctx.root)
            if relative is not None and not is_editable(relative, ctx) and (
                    os.path.lexists(real) or relative.split("/")[0] in PROTECTED_NAMES):
                raise Blocked(edit_reason(relative, ctx))
        raise Blocked("Change files with the Edit tool (only train.py and the memory files); "
                      "the helpers write logs, runs/ and the ledger.")
    if program not in READERS:
        raise Blocked(f"`{name}` is not among the commands a research session runs: use the helpers "
                      f"({HELPERS}), read-only git, or the Read and Grep tools.")
    return check_reader(name, args, ctx)


def check_wrapped(args, ctx):
    """sudo, timeout, env, xargs ... run the command after them: refuse with that command's own reason
    when it has one, else because wrappers are not needed."""
    rest = list(args)
    while rest and (rest[0].startswith("-") or re.fullmatch(r"[\d.]+[smhd]?", rest[0]) or "=" in rest[0]):
        rest.pop(0)
    if rest and rest[0] not in WRAPPERS:
        check_simple(rest, ctx)
    raise Blocked("Run the command itself, without sudo, env, timeout, xargs, nohup or nice: "
                  f"the helpers ({HELPERS}) enforce their own limits.")


def check_reader(name, args, ctx):
    if name == "find":
        return check_find(args, ctx)
    flags, valued = (set(part.split()) for part in READERS[name])
    if name in ("head", "tail"):
        args = ["-n" + arg[1:] if re.fullmatch(r"-\d+", arg) else arg for arg in args]
        if name == "tail" and any(arg in ("-f", "-F") or arg.startswith("--follow") or
                                  (re.fullmatch(r"-[a-zA-Z]+", arg) and "f" in arg.lower()) for arg in args):
            raise Blocked(REASON_FOLLOW)
    if name in ANY_TEXT:
        if name == "sleep" and not (len(args) == 1 and re.fullmatch(r"\d{1,3}", args[0])):
            raise Blocked("sleep takes a number of seconds, at most 999.")
        return None
    options, operands = parse_options(args, flags, valued)
    if name in ("date", "uname", "nproc", "uptime", "free", "whoami", "pwd", "true", "false", "nvidia-smi"):
        if operands and not (name == "date" and len(operands) == 1 and operands[0].startswith("+")):
            raise Blocked(f"`{name}` is allowed only to print, without operands.")
        return None
    if name == "sed":
        script = operands[:1]
        if not options or not script or not re.fullmatch(r"(\d{1,9}|\$)(,(\d{1,9}|\$))?p", script[0]):
            raise Blocked("sed may only print lines (`sed -n '10,60p' train.py`): change files with the Edit tool.")
        files = operands[1:]
        first, _, last = script[0][:-1].partition(",")
        span = (int(last) - int(first) + 1) if first.isdigit() and last.isdigit() else (1 if not last else 10**9)
        for path in files:
            check_read(path, ctx, whole=span > MAX_LOG_LINES)
        return None
    if name == "uniq" and len(operands) > 1:
        raise Blocked("uniq writes its second operand: give it one input file, or none (a pipe).")
    if name in ("grep", "rg"):
        return check_grep(name, options, operands, ctx)
    if name in ("head", "tail"):
        lines, from_start = 10, False
        for option, value in options:
            if option not in valued:
                continue
            count, from_start = count_value(value)
            lines = count // 80 if option in ("-c", "--bytes") else count
        logs = sum(is_log(path) for path in operands) or 1  # `head -n 50 run.log run.log` is 100 lines
        for path in operands:
            check_read(path, ctx, whole=(lines * logs > MAX_LOG_LINES or from_start))
        return None
    for path in operands:
        check_read(path, ctx, whole=name in ("cat", "sort", "cut", "uniq"))
        if name == "cat":
            real = resolve(path, ctx)
            if os.path.isfile(real) and os.path.getsize(real) > MAX_CAT_BYTES:
                raise Blocked(f"{path} is over {MAX_CAT_BYTES // 1000} KB: read it in parts "
                              "(the Read tool with offset and limit, or `sed -n '1,200p' FILE`).")
    if name in ("ls", "du"):
        for path in operands or ["."]:
            check_search_root(path, ctx) if ("-R", None) in options or name == "du" else check_read(path, ctx)
    return None


def check_grep(name, options, operands, ctx):
    names = {option for option, _ in options}
    patterns = [value for option, value in options if option in ("-e", "--regexp")]
    if not patterns and not names & {"-f", "--files"}:
        patterns, operands = operands[:1], operands[1:]
    for option, value in options:
        if option in ("-f", "--include", "--exclude", "-g", "--glob"):
            check_read(value, ctx)
    recursive = name == "rg" or names & {"-r", "-R", "--recursive"}
    for path in operands or (["."] if recursive else []):
        check_search_root(path, ctx, content=True) if recursive else check_read(path, ctx)
        if any(pattern in MATCH_ALL for pattern in patterns) and is_log(path) and not names & {"-c", "--count"}:
            raise Blocked(REASON_LOG)
    return None


FIND_PRIMARIES = {"-name": 1, "-iname": 1, "-path": 1, "-ipath": 1, "-type": 1, "-maxdepth": 1, "-mindepth": 1,
                  "-mtime": 1, "-mmin": 1, "-newer": 1, "-size": 1, "-print": 0, "-print0": 0, "-empty": 0,
                  "-not": 0, "!": 0, "-a": 0, "-o": 0, "-and": 0, "-or": 0, "-ls": 0}


def check_find(args, ctx):
    roots = []
    while args and not args[0].startswith("-") and args[0] != "!":
        roots.append(args.pop(0))
    index = 0
    while index < len(args):
        primary = args[index]
        if primary not in FIND_PRIMARIES:
            raise Blocked(f"find may only list files (-name, -type, -maxdepth, -newer ...): `{primary}` is not allowed.")
        if FIND_PRIMARIES[primary]:
            index += 1
            check_read(args[index] if index < len(args) else "", ctx)
        index += 1
    for root in roots or ["."]:
        check_search_root(root, ctx)


def check_uv(args, ctx):
    if args[:1] != ["run"]:
        if args[:2] == ["pip", "install"] and install_allowed():
            return None
        if args[:1] in (["add"], ["remove"], ["pip"], ["tool"], ["sync"], ["lock"], ["venv"], ["python"]):
            raise Blocked(REASON_INSTALL)
        raise Blocked(f"Of uv only `uv run scripts/<helper>.py` runs here: use the helpers ({HELPERS}).")
    rest = args[1:]
    if not rest or rest[0].startswith("-"):
        if any(arg.startswith("--with") for arg in rest):
            raise Blocked(REASON_INSTALL)
        raise Blocked(f"Run the helpers as `uv run scripts/<helper>.py`, with no uv options ({HELPERS}).")
    script, options = rest[0], rest[1:]
    name = os.path.basename(script)
    if name == "train.py":
        raise Blocked(REASON_TRAIN)
    where = "prepare.py" if name == "prepare.py" else f"scripts/{name}"
    if name in HELPER_FLAGS and script != where and resolve(script, ctx) == os.path.join(ctx.root, where):
        raise Blocked(f"Run it as `uv run {where}` from the project root, spelled exactly so.")
    if name not in HELPER_FLAGS or resolve(script, ctx) != os.path.join(ctx.root, where):
        if INTERPRETERS.match(name) or name.startswith("python"):
            raise Blocked(REASON_CODE)
        raise Blocked(f"`uv run {script}` is not a helper of this session: use {HELPERS}.")
    check_helper(name, options, ctx)


def check_helper(name, args, ctx):
    """The flags and operands of one helper call, and the memory protocol before experiments and decisions."""
    if "-h" in args or "--help" in args:
        return
    for arg in args:
        flag = arg.split("=")[0]
        if name == "status.py" and flag == "--report":
            raise Blocked(REASON_HELD_OUT)
        if flag in HUMAN_FLAGS:
            raise Blocked(f"`{flag}` is the human's, not the agent's ({HUMAN_FLAGS[flag]}).")
    if name == "prepare.py" and "score" in args:
        raise Blocked("`prepare.py score` is the referee's: the helpers score every run (`uv run scripts/status.py`).")
    for index, arg in enumerate(args):  # `--dataset local:PATH` reads PATH
        value = arg.partition("=")[2] if arg.startswith("--dataset=") else args[index + 1] if (
            arg == "--dataset" and index + 1 < len(args)) else ""
        if value.startswith("local:"):
            check_search_root(value[len("local:"):], ctx)
    flags = HELPER_FLAGS[name]
    _, operands = parse_options(args, {flag for flag, valued in flags.items() if not valued},
                                {flag for flag, valued in flags.items() if valued})
    if name == "prepare.py" and operands:
        raise Blocked("`prepare.py score` and other subcommands are the referee's: the helpers score every run.")
    if name in ("setup.py", "status.py", "plot.py") and operands:
        raise Blocked(f"`uv run scripts/{name}` takes no operands: `{operands[0]}`.")
    if name == "experiment.py" and len(operands) > 1:
        raise Blocked('Give experiment.py one quoted description: `uv run scripts/experiment.py "DESCRIPTION"`.')
    if name == "memory.py" and (operands[:1] != ["search"] or len(operands) != 2):
        raise Blocked('Search the memory with one quoted query: `uv run scripts/memory.py search "QUERY"`.')
    if name == "decide.py":
        action = operands[:1]
        if action not in (["keep"], ["discard"], ["backtrack"]) or len(operands) > (2 if action == ["backtrack"] else 1):
            raise Blocked("Decide with `uv run scripts/decide.py keep|discard`, or rewind with "
                          "`uv run scripts/decide.py backtrack [COMMIT]`.")
    if name in ("experiment.py", "decide.py"):
        check_memory_protocol(name, args, operands, ctx.root)


def check_memory_protocol(name, args, operands, root):
    """REASONING before each experiment, ANALYSIS before each decision (baseline exempt)."""
    try:
        state = read_state(root)
    except StateUnavailable:
        return  # the helper itself will say what is wrong
    if state is None or not state["rows"]:
        return  # no session, or the baseline: nothing to reason about yet
    if name == "experiment.py" and "--confirm" in args:
        return  # a confirmation re-runs the pending candidate under a new seed: no new hypothesis
    if name == "experiment.py" and newest_log_block(root) != "REASONING":
        raise Blocked(REASON_NEED_REASONING)
    if name == "decide.py" and operands[:1] in (["keep"], ["discard"]) and state["pending"] \
            and newest_log_block(root) != "ANALYSIS":
        raise Blocked(REASON_NEED_ANALYSIS)


def check_git(args, ctx):
    if re.search(r"\bpush\b", " ".join(args)):  # also `git -c alias.p=push p`
        raise Blocked(REASON_PUSH)
    if not args or args[0].startswith("-"):
        raise Blocked(REASON_GIT)
    sub, rest = args[0], args[1:]
    if sub in GIT_NETWORK:
        raise Blocked(REASON_NETWORK)
    if sub in GIT_HISTORY:
        raise Blocked(GIT_HISTORY[sub])
    if sub == "add":
        for arg in rest:
            relative = relative_to_project(resolve(arg, ctx), ctx.root) or ""
            if relative.startswith(GIT_NEVER_ADD) or is_log(arg):
                raise Blocked(REASON_ADD_LEDGER)
        raise Blocked(REASON_COMMIT)
    if sub in ("checkout", "restore"):
        return check_git_restore(sub, rest, ctx)
    if sub not in GIT_READ:
        raise Blocked(REASON_GIT)
    for arg in rest:
        name = arg.split("=")[0]
        if arg.startswith("-O") or name.startswith("--") and len(name) > 3 and any(  # git accepts abbreviations
                unsafe.startswith(name) or name.startswith(unsafe) for unsafe in GIT_UNSAFE_OPTIONS):
            raise Blocked(REASON_GIT)
    if sub == "branch":
        listing = "--list" in rest or "-l" in rest
        for previous, arg in zip([""] + rest, rest):
            if (arg.split("=")[0] not in GIT_BRANCH_LIST if arg.startswith("-") else
                    not listing and previous not in ("--contains", "--merged", "--no-merged", "--sort")):
                raise Blocked("git branch only lists here (`git branch --list`): the helpers create and move branches.")


def check_git_restore(sub, rest, ctx):
    """`git checkout [REF] -- train.py` / `git restore train.py` rewrite only train.py: allowed like an edit."""
    if "--" in rest:
        before, paths = rest[:rest.index("--")], rest[rest.index("--") + 1:]
    else:
        before, paths = [], rest
    if sub == "restore" or any(arg.startswith("-") for arg in before + paths) or len(before) > 1 or not paths:
        raise Blocked(REASON_RESET if sub == "checkout" and not paths else
                      "Restore train.py with `git checkout -- train.py`; other files are not yours to change.")
    for path in paths:
        relative = relative_to_project(resolve(path, ctx), ctx.root) or ""
        if not os.path.exists(resolve(path, ctx)) and relative.split("/")[0] not in PROTECTED_NAMES:
            raise Blocked(REASON_RESET)  # `git checkout BRANCH` switches branches: the helpers do that
        check_edit(path, ctx)


def check_bash(tool_input, ctx):
    command = tool_input.get("command")
    if not isinstance(command, str) or not command.strip():
        raise Blocked("This Bash call has no command.")
    if tool_input.get("dangerouslyDisableSandbox"):
        raise Blocked("Commands run inside the sandbox: call it again without dangerouslyDisableSandbox.")
    commands = simple_commands(command)
    for argv, _ in commands:  # helpers that sandbox themselves must run alone, or Claude Code sandboxes them
        if argv[:2] == ["uv", "run"] and len(argv) > 2 and os.path.basename(argv[2]) in STANDALONE and (
                len(commands) > 1 or re.search(r"[<>]", unquoted(re.sub(r"\s2>&1\s*$", "", command), double=False))):
            raise Blocked(f"Run `uv run {argv[2]}` on its own, not in a pipe, chain or redirect: "
                          "it prints a line or three already.")
    for argv, _ in commands:  # first what no command may touch, whatever runs it
        for arg in argv:
            if is_secret(arg):
                raise Blocked(REASON_SECRET)
            if is_held_out(arg):
                raise Blocked(REASON_HELD_OUT)
    for argv, redirects in commands:
        check_simple(argv, ctx)
        for operator, target in redirects:  # after the program's own rule, whose reason is the more useful one
            if is_secret(target):
                raise Blocked(REASON_SECRET)
            check_redirect(operator, target, ctx)


# ---------------------------------------------------------------------------------------------
# Tools


def patch_files(patch):
    """The files a Codex apply_patch names: Add, Update, Delete File and Move to lines."""
    if isinstance(patch, list):
        patch = "\n".join(str(part) for part in patch)
    files = re.findall(r"^\*\*\* (?:Add File|Update File|Delete File|Move to): *(.+?)\s*$", str(patch), flags=re.M)
    if not files:
        raise Blocked("This patch names no file (*** Update File: train.py): only train.py and the memory files may change.")
    return files


def check_tool(payload, root):
    if not isinstance(payload, dict):
        raise Blocked("The hook input is not a tool call.")
    tool, tool_input = payload.get("tool_name"), payload.get("tool_input") or {}
    if not isinstance(tool_input, dict):
        raise Blocked("The tool input is not an object.")
    cwd = payload.get("cwd") if isinstance(payload.get("cwd"), str) and os.path.isabs(payload["cwd"]) else root
    ctx = Context(root, cwd)
    if tool == "Bash":
        check_bash(tool_input, ctx)
    elif tool in ("Edit", "Write", "MultiEdit", "NotebookEdit"):
        check_edit(tool_input.get("file_path") or tool_input.get("notebook_path"), ctx)
    elif tool == "apply_patch":
        for path in patch_files(tool_input.get("command") or tool_input.get("patch") or tool_input.get("input")):
            check_edit(path, ctx)
    elif tool == "Read":
        path = tool_input.get("file_path")
        if not isinstance(path, str) or not path:
            raise Blocked("This Read names no file.")
        check_read(path, ctx)
        limit = tool_input.get("limit")
        if is_log(path) and not (type(limit) is int and 0 < limit <= MAX_LOG_LINES):
            raise Blocked(REASON_READ_LOG)
    elif tool in ("Grep", "Glob", "LS"):
        pattern, where = str(tool_input.get("pattern") or ""), tool_input.get("path") or ctx.cwd
        only = os.path.basename(str(tool_input.get("glob") or "*"))  # a Grep of *.py reads no held-out log
        check_search_root(where, ctx, content=tool == "Grep" and any(
            fnmatch.fnmatch(name, only) for name in ("referee-test.log", "heldout.json")))
        for text in (tool_input.get("glob"), pattern if tool == "Glob" else None):
            if text:
                check_read(os.path.join(str(where), str(text)), ctx)
        wide = tool_input.get("output_mode") == "content" and not (
            type(tool_input.get("head_limit")) is int and 0 < tool_input["head_limit"] <= MAX_LOG_LINES)
        if tool == "Grep" and pattern in MATCH_ALL and wide and (is_log(where) or ".log" in str(tool_input.get("glob"))):
            raise Blocked(REASON_READ_LOG)
    elif tool in ("WebFetch", "WebSearch"):
        raise Blocked(REASON_NETWORK)
    elif tool not in SAFE_TOOLS:
        raise Blocked(f"The guard does not know the tool {str(tool)[:60]!r}, so it refuses it: use Bash, Read, "
                      "Grep, Glob, Edit or Write.")


def main():
    if os.environ.get("AUTORESEARCH_MAINTAINER") == "1":
        return 0
    try:
        check_tool(json.loads(sys.stdin.read()), project_root())
        return 0
    except Blocked as blocked:
        reason = str(blocked)
    except Exception as error:  # noqa: BLE001 - a bug here must refuse, never allow
        reason = REASON_CRASH.format(error=f"{type(error).__name__}: {str(error)[:120]}")
    reason = " ".join(reason.split())  # one line
    json.dump({"hookSpecificOutput": {
        "hookEventName": "PreToolUse",
        "permissionDecision": "deny",
        "permissionDecisionReason": reason,
    }}, sys.stdout)
    print(reason, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
