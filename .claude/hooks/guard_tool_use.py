#!/usr/bin/env python3
"""PreToolUse guard: the rules of program.md that a machine can check, checked before each tool call.

Why a hook: an unattended agent breaks prose rules (it edits the referee, cats a 2 MB log into its
context, pushes, installs packages), and in `claude -p` runs of an untrusted workspace the
permission allow/deny lists of .claude/settings.json may not apply, while hooks always run. So the
rules live here, and every block names the command to use instead.

Blocked:
- Edit/Write/MultiEdit/NotebookEdit of anything but train.py and the memory files (notes.md,
  REPORT.md, .claude/context/memory/*.md); the same for shell writes (`>`, tee, sed -i, cp, mv, rm)
  into the project.
- Reading whole logs: cat/less/more of a *.log, head/tail of more than 50 lines or following it,
  a Read of a log without a limit of at most 50 lines.
- git push, git add of the ledger or logs, raw git commit/reset/checkout/rebase/merge/clean (the
  helpers commit, reset and rewind), running train.py directly (experiment.py does it).
- Skipping the memory protocol during a session: `experiment.py` unless the newest Experiment Log
  block in notes.md is a REASONING block, `decide.py keep|discard` unless it is an ANALYSIS block
  (the baseline is exempt).
- Installing packages (pip, uv add/pip/remove, uv run --with, uvx, conda, apt, npm ...), unless
  AUTORESEARCH_ALLOW_INSTALL=1 (set by `scripts/loop.py --allow-install`, which records what was installed).
- Network access (curl, wget, ssh, git fetch/pull/clone ...) and reading secrets (~/.ssh ...).
Compound commands (&&, ||, ;, |, &, newlines, ( ), $( ), backticks, bash -c '...', eval, heredocs
fed to a shell) are split and each part is checked.

.claude/settings.json backs this up: Bash and Read rules in `deny`, but Edit rules for protected
files in `ask`, because Claude Code checks an Edit-path deny rule before any hook runs and answers
with a generic message, while an ask rule comes after the hook (so this reason reaches the agent)
and, unattended, nobody is there to grant it.

Input: the PreToolUse JSON on stdin. Output: nothing (allowed) or a JSON "deny" decision with a
one-line reason. A maintainer working on the harness itself (not a research session) starts
Claude Code with AUTORESEARCH_MAINTAINER=1 to switch the guard off; the agent cannot set that.

Usage: python3 .claude/hooks/guard_tool_use.py < payload.json
"""

import json
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from research_state import StateUnavailable, project_root, read_state  # noqa: E402

MAX_LOG_LINES = 50  # enough to see a traceback's end; a full run.log is thousands of lines

EDITABLE = ("train.py", "notes.md", "REPORT.md")
EDITABLE_FOLDER = ".claude/context/memory"

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
REASON_TRAIN = (
    'Run experiments through the helper: `uv run scripts/experiment.py "DESCRIPTION"` '
    "(it commits train.py, enforces the time limit, logs to a file and compares with the best)."
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
REASON_NEED_REASONING = (
    "Write this experiment's REASONING block in notes.md first (### REASONING: NAME, with "
    "hypothesis, evidence, risk, under ## Experiment Log), then run `uv run scripts/experiment.py \"DESCRIPTION\"`."
)
REASON_NEED_ANALYSIS = (
    "Write the ANALYSIS block in notes.md first (### ANALYSIS: NAME, with result, vs expected, why, "
    "lesson), then run `uv run scripts/decide.py keep|discard`."
)
REASON_UNPARSED = "Could not parse this shell command (unbalanced quotes?): split it into simpler commands."

PACKAGE_MANAGERS = {
    "pip": {"install", "download", "uninstall"},
    "pip3": {"install", "download", "uninstall"},
    "uv": {"add", "remove", "pip", "tool"},
    "conda": {"install", "create", "update"},
    "mamba": {"install", "create", "update"},
    "apt": {"install"},
    "apt-get": {"install"},
    "npm": {"install", "i", "add", "ci"},
    "yarn": {"add", "install"},
    "pnpm": {"add", "install", "i"},
    "poetry": {"add", "install"},
    "cargo": {"install", "add"},
}
INSTALLERS = {"uvx", "pipx", "easy_install", "brew"}
NETWORK_TOOLS = {
    "curl", "wget", "aria2c", "http", "https", "httpie", "xh", "ssh", "scp", "sftp", "ftp",
    "rsync", "nc", "ncat", "netcat", "telnet", "socat", "gh", "huggingface-cli", "hf",
}
GIT_NETWORK = {"push", "fetch", "pull", "clone", "ls-remote", "remote", "submodule"}
GIT_HISTORY = {"commit": REASON_COMMIT, "reset": REASON_RESET, "rebase": REASON_RESET,
               "merge": REASON_RESET, "cherry-pick": REASON_RESET, "revert": REASON_RESET,
               "clean": REASON_CLEAN, "filter-branch": REASON_RESET, "update-ref": REASON_RESET}
GIT_NEVER_ADD = ("results.tsv", "run.log", "runs", "notes.md", ".claude/context/memory")
WHOLE_FILE_READERS = {
    "cat", "less", "more", "bat", "batcat", "tac", "nl", "view", "vim", "vi", "nano", "emacs", "strings", "zcat", "xxd", "od",
}
SHELLS = {"bash", "sh", "zsh", "dash", "ksh"}
WRAPPERS = {  # words that run the command after them (shell keywords included: `if git push; then`)
    "sudo", "time", "nice", "nohup", "command", "exec", "builtin", "stdbuf", "ionice", "xargs", "doas",
    "then", "do", "else", "elif", "if", "while", "until", "!", "{",
}
FILE_MOVERS = {"cp", "mv", "rm", "ln", "truncate", "install", "touch", "chmod", "chown", "rmdir", "unlink", "shred"}
HELD_OUT_FILES = ("heldout.json", "test_rows.npy", "test_tokens.bin")
REASON_HELD_OUT = (
    "The held-out test split is for the human's morning check, never for decisions: "
    "judge by val_bpb with `uv run scripts/status.py`."
)
SECRET_PATTERNS = (
    re.compile(r"(^|/|~)\.ssh(/|$)"), re.compile(r"(^|/|~)\.aws(/|$)"), re.compile(r"(^|/)\.netrc$"),
    re.compile(r"(^|/)\.git-credentials$"), re.compile(r"(^|/)\.env(\.[\w.-]+)?$"),
    re.compile(r"(^|/)\.config/gh(/|$)"), re.compile(r"(^|/|~)\.gnupg(/|$)"),
)
OPERATORS = re.compile(r"&&|\|\||;;|\|&|&>>|&>|>>|<<<|<<-|<<|>&|<&|>\||<>|[;&|()<>\n]")
CONTROL = {"&&", "||", ";;", "|&", ";", "&", "|", "(", ")", "\n"}
REDIRECTS = {"&>>", "&>", ">>", "<<<", "<<-", "<<", ">&", "<&", ">|", "<>", "<", ">"}
OUTPUT_REDIRECTS = {"&>>", "&>", ">>", ">|", ">"}
LOG_BLOCK = re.compile(r"^###\s+(REASONING|ANALYSIS)\b", re.M | re.I)
HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][\w.-]*)\1")


def install_allowed():
    """scripts/loop.py --allow-install sets this for its agent, and records what gets installed."""
    return os.environ.get("AUTORESEARCH_ALLOW_INSTALL") == "1"


class Blocked(Exception):
    """Raised with the one-line reason when a tool call breaks a rule."""


# ---------------------------------------------------------------------------------------------
# Paths


def resolve(path, cwd):
    """`path` as an absolute, normalised path (~ expanded, relative to the tool's cwd)."""
    path = os.path.expanduser(path)
    return os.path.normpath(os.path.join(cwd, path))


def relative_to_project(path, root):
    """`path` relative to the project root, or None when it lies outside the project."""
    real = os.path.realpath(path)
    if real != root and not real.startswith(root + os.sep):
        return None
    return os.path.relpath(real, root).replace(os.sep, "/")


def is_editable(relative):
    if relative in EDITABLE:
        return True
    folder, name = os.path.split(relative)
    return folder == EDITABLE_FOLDER and name.endswith(".md")


def edit_reason(relative):
    """Why `relative` (a project path) may not be edited, naming what to do instead."""
    if relative == "STOP":
        return "Only the human ends the session by creating STOP: keep experimenting (see program.md, Never stop)."
    if relative == "prepare.py":
        what = "prepare.py is the fixed protocol (the referee of every result)"
    elif relative in ("results.tsv", "results.tsv.example", "runs", "run.log") or relative.startswith("runs/"):
        what = f"{relative} is written by the helpers (`uv run scripts/decide.py keep|discard`)"
    elif relative.startswith(("scripts/", ".claude/", "skills/", ".claude-plugin/")) or relative in (
        "program.md", "CLAUDE.md", "AGENTS.md"
    ):
        what = f"{relative} belongs to the research org, which the human owns"
    else:
        what = f"{relative} is not part of the experiment"
    return f"Only train.py and the memory files (notes.md, .claude/context/memory/*.md, REPORT.md) may be edited: {what}."


def is_log(path):
    return os.path.basename(path).endswith(".log")


def is_held_out(path):
    """The held-out test scores: seeing them would turn the test split into a second val split."""
    return os.path.basename(path) in HELD_OUT_FILES


def is_secret(path):
    path = path.replace(os.sep, "/")
    return any(pattern.search(path) for pattern in SECRET_PATTERNS)


def check_write(path, cwd, root):
    if path in ("/dev/null", "/dev/stdout", "/dev/stderr") or path.startswith("/dev/fd/"):
        return
    relative = relative_to_project(resolve(path, cwd), root)
    if relative is not None and not is_editable(relative):
        raise Blocked(edit_reason(relative))


# ---------------------------------------------------------------------------------------------
# Shell parsing


def split_heredocs(command):
    """(command without heredoc bodies, [bodies]); the bodies are data unless fed to a shell."""
    lines = command.split("\n")
    kept, bodies, index = [], [], 0
    while index < len(lines):
        line = lines[index]
        kept.append(line)
        index += 1
        for match in HEREDOC.finditer(line):
            if line[max(0, match.start() - 1):match.start()] == "<":  # a <<< here-string
                continue
            terminator, body = match.group(2), []
            while index < len(lines) and lines[index].strip() != terminator:
                body.append(lines[index])
                index += 1
            index += 1  # the terminator line
            bodies.append("\n".join(body))
    return "\n".join(kept), bodies


def tokenize(command):
    lexer = shlex.shlex(command.replace("`", " ` "), posix=True, punctuation_chars="();<>|&\n")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        raw = list(lexer)
    except ValueError as error:
        raise Blocked(REASON_UNPARSED) from error
    tokens = []
    for token in raw:  # shlex glues neighbouring operators (");" or ">&"): split them apart
        if token and set(token) <= set("();<>|&\n"):
            tokens.extend(OPERATORS.findall(token))
        else:
            tokens.append(token)
    return tokens


def substitutions(word):
    """The commands inside $( ... ) in one word (quoted words keep them whole)."""
    found, start = [], word.find("$(")
    while start != -1:
        depth, index = 0, start + 1
        while index < len(word):
            depth += {"(": 1, ")": -1}.get(word[index], 0)
            if depth == 0:
                break
            index += 1
        found.append(word[start + 2:index])
        start = word.find("$(", index)
    return found


def simple_commands(command):
    """Yield (argv, output redirect targets, fed_heredoc) for every simple command in `command`."""
    command, bodies = split_heredocs(command)
    segment, outputs, heredoc = [], [], False
    tokens = tokenize(command)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in CONTROL or token == "`":
            if segment or outputs:
                yield segment, outputs, heredoc
            segment, outputs, heredoc = [], [], False
        elif token in REDIRECTS:
            target = tokens[index + 1] if index + 1 < len(tokens) else ""
            if segment and segment[-1].isdigit():
                segment.pop()  # the fd number of `2>`
            if token in OUTPUT_REDIRECTS or (token == ">&" and not target.isdigit() and target != "-"):
                outputs.append(target)
            heredoc = heredoc or token in ("<<", "<<-")
            index += 1
        else:
            segment.append(token)
            for inner in substitutions(token):
                yield from simple_commands(inner)
        index += 1
    if segment or outputs:
        yield segment, outputs, heredoc
    for body in bodies:
        yield ["<heredoc>", body], [], False


def unwrap(argv):
    """argv without env assignments and wrappers (sudo, env, timeout, nice, uv run, python -m ...)."""
    argv = list(argv)
    while argv:
        word = argv[0]
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", word) or word in WRAPPERS:
            argv.pop(0)
            while word in ("sudo", "nice", "stdbuf", "ionice", "xargs", "doas") and argv and argv[0].startswith("-"):
                flag = argv.pop(0)
                if word in ("nice", "sudo") and flag in ("-n", "-u", "-g") and argv:
                    argv.pop(0)
        elif word == "env":
            argv.pop(0)
            while argv and (argv[0].startswith("-") or "=" in argv[0]):
                argv.pop(0)
        elif word == "timeout":
            argv.pop(0)
            while argv and argv[0].startswith("-"):
                argv.pop(0)
            if argv:
                argv.pop(0)  # the duration
        elif word == "uv" and len(argv) > 1 and argv[1] == "run":
            if ("--with" in argv or any(arg.startswith("--with=") or arg == "--with-requirements" for arg in argv)) \
                    and not install_allowed():
                raise Blocked(REASON_INSTALL)
            argv = argv[2:]
            while argv and argv[0].startswith("-"):
                flag = argv.pop(0)
                if flag in ("--python", "-p", "--project", "--directory", "--group", "--extra", "--env-file") and argv:
                    argv.pop(0)
        elif re.match(r"^python(3(\.\d+)?)?$", os.path.basename(word)) and len(argv) > 2 and argv[1] == "-m":
            argv = argv[2:]
        else:
            break
    return argv


# ---------------------------------------------------------------------------------------------
# Rules for one simple command


def line_count(args):
    """The number of lines head/tail would print, or None when it follows (-f) the file."""
    count = 10
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in ("-f", "-F", "--follow") or arg.startswith("--follow="):
            return None
        if arg in ("-n", "--lines", "-c", "--bytes") and index + 1 < len(args):
            value = args[index + 1]
            index += 1
        elif arg.startswith("--lines=") or arg.startswith("--bytes="):
            value = arg.split("=", 1)[1]
        elif re.match(r"^-[nc].+", arg):
            value = arg[2:]
        elif re.match(r"^-\d+$", arg):
            value = arg[1:]
        else:
            index += 1
            continue
        if arg.startswith(("-c", "--bytes")):  # bytes: count them as lines of 80 characters
            digits = re.sub(r"\D", "", value)
            count = int(digits) // 80 if digits else 10**9
        elif value.startswith("+"):
            count = 10**9  # `tail -n +1` prints from line 1: the whole file
        else:
            digits = re.sub(r"\D", "", value)
            count = int(digits) if digits else 10**9
        index += 1
    return count


def check_git(args, cwd, root):
    index = 0
    while index < len(args) and args[index].startswith("-"):  # git -C DIR -c KEY=VALUE ...
        index += 2 if args[index] in ("-C", "-c", "--git-dir", "--work-tree") else 1
    if index >= len(args):
        return
    sub, rest = args[index], args[index + 1:]
    if sub == "push":
        raise Blocked(REASON_PUSH)
    if sub in GIT_NETWORK:
        if sub == "remote" and not any(word in rest for word in ("add", "set-url", "update")):
            return
        if sub == "submodule" and not any(word in rest for word in ("update", "add")):
            return
        raise Blocked(REASON_NETWORK)
    if sub in GIT_HISTORY:
        raise Blocked(GIT_HISTORY[sub])
    if sub == "stash" and any(flag in rest for flag in ("-a", "--all")):
        raise Blocked(REASON_CLEAN)
    if sub == "add":
        for arg in rest:
            relative = relative_to_project(resolve(arg, cwd), root) if not arg.startswith("-") else None
            if (relative and relative.startswith(GIT_NEVER_ADD)) or is_log(arg):
                raise Blocked(REASON_ADD_LEDGER)
    if sub in ("checkout", "switch"):
        # `git checkout [REF] -- FILES` and `git checkout FILES` only change files (checked like
        # any write); switching branches or commits is the helpers' job.
        if "--" in rest:
            paths = rest[rest.index("--") + 1:]
        else:
            paths = [arg for arg in rest if not arg.startswith("-")]
            if sub == "switch" or not paths or not all(os.path.exists(resolve(arg, cwd)) for arg in paths):
                raise Blocked(REASON_RESET)
        for path in paths:
            check_write(path, cwd, root)


def newest_log_block(root):
    """'REASONING', 'ANALYSIS' or None: the kind of the last such block in notes.md."""
    try:
        with open(os.path.join(root, "notes.md"), encoding="utf-8") as handle:
            text = re.sub(r"<!--.*?-->", "", handle.read(), flags=re.S)  # the template's examples
    except OSError:
        return None
    blocks = LOG_BLOCK.findall(text)
    return blocks[-1].upper() if blocks else None


def check_memory_protocol(program, args, root):
    """REASONING before each experiment, ANALYSIS before each decision (baseline exempt)."""
    if "-h" in args or "--help" in args:
        return
    try:
        state = read_state(root)
    except StateUnavailable:
        return  # the helper itself will say what is wrong
    if state is None or not state["rows"]:
        return  # no session, or the baseline: nothing to reason about yet
    if program == "experiment.py" and "--confirm" in args:
        return  # a confirmation re-runs the pending candidate under a new seed: no new hypothesis
    if program == "experiment.py" and newest_log_block(root) != "REASONING":
        raise Blocked(REASON_NEED_REASONING)
    if program == "decide.py" and args[:1] in (["keep"], ["discard"]) and state["pending"] \
            and newest_log_block(root) != "ANALYSIS":
        raise Blocked(REASON_NEED_ANALYSIS)


def check_simple(argv, heredoc, cwd, root, bodies_seen):
    if argv and argv[0] == "<heredoc>":
        return
    argv = unwrap(argv)
    if not argv:
        return
    program, args = os.path.basename(argv[0]), argv[1:]
    if any(is_secret(arg) for arg in argv):
        raise Blocked(REASON_SECRET)
    if any(is_held_out(arg) for arg in argv) or (program == "status.py" and "--report" in args):
        raise Blocked(REASON_HELD_OUT)
    if program in SHELLS or program == "eval":
        if "-c" in args and args.index("-c") + 1 < len(args):
            check_command(args[args.index("-c") + 1], cwd, root)
        elif program == "eval":
            check_command(" ".join(args), cwd, root)
        elif heredoc or not [arg for arg in args if not arg.startswith("-")]:
            for body in bodies_seen:  # `bash <<EOF ... EOF` runs its body
                check_command(body, cwd, root)
        return
    if program == "git":
        check_git(args, cwd, root)
        return
    if program in NETWORK_TOOLS:
        raise Blocked(REASON_NETWORK)
    if (program in INSTALLERS or (program in PACKAGE_MANAGERS and args and args[0] in PACKAGE_MANAGERS[program])) \
            and not install_allowed():
        raise Blocked(REASON_INSTALL)
    if program == "train.py" or (re.match(r"^(python(3(\.\d+)?)?|torchrun|accelerate)$", program) and any(
        os.path.basename(arg) == "train.py" for arg in args[:3]
    )):
        raise Blocked(REASON_TRAIN)
    if program in ("experiment.py", "decide.py") and os.path.basename(os.path.dirname(argv[0]) or "scripts") == "scripts":
        check_memory_protocol(program, args, root)
    files = [arg for arg in args if not arg.startswith("-")]
    if program in WHOLE_FILE_READERS and any(is_log(name) for name in files):
        raise Blocked(REASON_LOG)
    if program in ("head", "tail") and any(is_log(name) for name in files):
        count = line_count(args)
        if count is None or count > MAX_LOG_LINES:
            raise Blocked(REASON_LOG)
    if program == "tee":
        for name in files:
            check_write(name, cwd, root)
    if program in ("sed", "perl") and any(arg.startswith("-i") or re.match(r"^-\w*i", arg) for arg in args):
        for name in files[1:] if program == "sed" else files:
            check_write(name, cwd, root)
    if program in FILE_MOVERS:
        targets = files[-1:] if program in ("cp", "ln", "install") else files
        for name in targets:
            check_write(name, cwd, root)
    if program == "dd":
        for arg in args:
            if arg.startswith("of="):
                check_write(arg[3:], cwd, root)


def check_command(command, cwd, root):
    """Raise Blocked when any simple command inside the shell command `command` breaks a rule."""
    _, bodies = split_heredocs(command)
    for argv, outputs, heredoc in simple_commands(command):
        check_simple(argv, heredoc, cwd, root, bodies)
        for target in outputs:  # after the program's own rule, whose reason is the more useful one
            if is_secret(target):
                raise Blocked(REASON_SECRET)
            check_write(target, cwd, root)


# ---------------------------------------------------------------------------------------------
# Tools


def check_tool(payload, root):
    tool, tool_input = payload.get("tool_name", ""), payload.get("tool_input") or {}
    cwd = payload.get("cwd") or root
    if tool == "Bash":
        check_command(str(tool_input.get("command", "")), cwd, root)
    elif tool in ("Edit", "Write", "MultiEdit", "NotebookEdit"):
        path = tool_input.get("file_path") or tool_input.get("notebook_path") or ""
        if is_secret(path):
            raise Blocked(REASON_SECRET)
        relative = relative_to_project(resolve(path, cwd), root)
        if relative is None or not is_editable(relative):
            raise Blocked(edit_reason(relative or path))
    elif tool == "Read":
        path = str(tool_input.get("file_path", ""))
        if is_secret(path):
            raise Blocked(REASON_SECRET)
        if is_held_out(path):
            raise Blocked(REASON_HELD_OUT)
        limit = tool_input.get("limit")
        if is_log(path) and not (isinstance(limit, int) and 0 < limit <= MAX_LOG_LINES):
            raise Blocked(REASON_READ_LOG)


def main():
    if os.environ.get("AUTORESEARCH_MAINTAINER") == "1":
        return 0
    try:
        payload = json.load(sys.stdin)
    except ValueError:
        return 0  # not a payload we understand: never block on our own bug
    try:
        check_tool(payload, project_root(payload))
    except Blocked as blocked:
        json.dump({"hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "deny",
            "permissionDecisionReason": str(blocked),
        }}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
