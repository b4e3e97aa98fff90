"""Where the headless loop's proposals come from: the human queue, the random proposer, an agent CLI.

Used by scripts/loop.py; nothing here touches the ledger, the branch or the loop's state.

- The human queue: `next_proposal.json` at the root, then the files of `proposals/` in name order.
  Each is a JSON object with a `description` and either `instructions` (for the agent) or a
  `patch` (a unified diff of train.py); `hypothesis` is optional.
- The random proposer: one setting of train.py's hyperparameter block, perturbed within sane
  bounds (multiplicative for rates and sizes, additive for fractions), reproducible from a seed.
  It needs no LLM: the offline default, and an honest baseline for an agent's search. For an
  external task (autoresearch.toml) it perturbs the numeric UPPER_CASE settings at the top level of
  the task's first editable file, each by a factor.
- Agent CLIs: `claude -p`, `codex exec`, `opencode run`, or any command template. Each gets one
  prompt (build_prompt: the task, the rules of a headless iteration, the state, notes.md, PLAN.md,
  program.md and the loop skill), edits train.py, and ends its answer with a JSON object
  {"hypothesis", "description"}. Codex and OpenCode hold the same rules as Claude Code through
  the repository's own configuration (.codex/, opencode.json and its guard plugin): the command
  lines built here load it as it is, without touching the user's own configuration.

Usage (from loop.py):
    import proposers
    proposal = proposers.random_proposal(train_text, profile, max_seq_len, seed, iteration, tried)
    command = proposers.agent_command("claude", prompt, options)
"""

import ast
import difflib
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import sys
from pathlib import Path

import common

# ---------------------------------------------------------------------------
# The human queue

QUEUE_FILE = common.ROOT / "next_proposal.json"
QUEUE_DIR = common.ROOT / "proposals"
IDEA_FILE = common.ROOT / "IDEA.md"  # the human's research direction; the first agent call plans from it
PLAN_FILE = common.ROOT / "PLAN.md"  # that plan, saved by the loop from the agent's answer
PROGRAM_FILE = common.ROOT / "program.md"
SKILL_FILE = common.ROOT / "skills" / "ml-experiment-loop" / "SKILL.md"


def queued_proposal_files():
    """Proposal files waiting in the human queue, in the order they will be used."""
    files = [QUEUE_FILE] if QUEUE_FILE.is_file() else []
    if QUEUE_DIR.is_dir():
        files += sorted(path for path in QUEUE_DIR.iterdir() if path.is_file() and path.suffix == ".json")
    return files


def read_queued_proposal(path):
    """(proposal, None) or (None, why it is unusable) for one queue file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        return None, f"{Path(path).name} is not a JSON object ({error})"
    if not isinstance(data, dict) or not str(data.get("description") or "").strip():
        return None, f"{Path(path).name} has no description"
    instructions, patch = data.get("instructions"), data.get("patch")
    if bool(instructions) == bool(patch):
        return None, f"{Path(path).name} needs either instructions (for the agent) or a patch to train.py"
    return {"source": "queue", "queue_file": str(path), "description": " ".join(str(data["description"]).split()),
            "hypothesis": str(data.get("hypothesis") or "proposed by the human queue"),
            "instructions": instructions, "patch": patch}, None


# ---------------------------------------------------------------------------
# train.py's hyperparameter block

ASSIGNMENT = re.compile(r"^(?P<indent>[ \t]*)(?P<name>[A-Z][A-Z0-9_]*)(?P<gap>\s*=\s*)(?P<value>[^#\n]*?)"
                        r"(?P<comment>\s*#.*)?$")
PROFILE_BLOCK = re.compile(r"""^if\s+(?P<condition>PROFILE\b[^:#]*?)\s*:""")  # common.profile_block_applies

# name: (how it moves, lowest, highest). Rates and sizes move by a factor; sizes that the code
# splits into heads or batches stay powers of two; fractions move by a step, since 0 is common.
SEARCH_SPACE = {
    "DEPTH": ("integer", 1, 32),
    "ASPECT_RATIO": ("power_of_two", 16, 512),
    "HEAD_DIM": ("power_of_two", 16, 256),
    "TOTAL_BATCH_SIZE": ("power_of_two", 2**10, 2**24),
    "DEVICE_BATCH_SIZE": ("power_of_two", 1, 1024),
    "EMBEDDING_LR": ("factor", 1e-4, 10.0),
    "UNEMBEDDING_LR": ("factor", 1e-5, 1.0),
    "MATRIX_LR": ("factor", 1e-4, 1.0),
    "SCALAR_LR": ("factor", 1e-4, 10.0),
    "WEIGHT_DECAY": ("step", 0.0, 1.0),
    "WARMUP_RATIO": ("step", 0.0, 0.5),
    "WARMDOWN_RATIO": ("step", 0.0, 1.0),
    "FINAL_LR_FRAC": ("step", 0.0, 0.5),
    "LOGIT_SOFTCAP": ("factor", 5.0, 100.0),
}
FACTORS = (0.5, 0.7, 0.8, 1.25, 1.4, 2.0)
STEPS = (-0.2, -0.1, -0.05, 0.05, 0.1, 0.2)
DRAWS = 200  # attempts at a fresh, valid perturbation before giving up


def literal(text):
    """The number a hyperparameter line assigns (2**19 and 1e-3 included), or None."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.Mult, ast.Div)):
            left, right = value(node.left), value(node.right)
            return left ** right if isinstance(node.op, ast.Pow) else left * right if isinstance(node.op, ast.Mult) \
                else left / right
        raise ValueError(ast.dump(node))

    try:
        return value(tree)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError):
        return None


def active_assignments(text, profile):
    """{NAME: (line index, number)} for the numeric UPPER_CASE settings in effect under `profile`.

    Top-level assignments, replaced by those inside an `if PROFILE ...:` block that applies to it
    (common.profile_block_applies): on the cpu profiles train.py overrides the model size and rates
    there, and perturbing the top-level value would change nothing."""
    top, override, inside = {}, {}, None
    for index, line in enumerate(text.splitlines()):
        header = PROFILE_BLOCK.match(line)
        if header:
            inside = common.profile_block_applies(header.group("condition"), profile)
            continue
        if line.strip() and not line[0].isspace():
            inside = None
        match = ASSIGNMENT.match(line)
        number = literal(match.group("value")) if match else None
        if number is None:
            continue
        if not match.group("indent"):
            top[match.group("name")] = (index, number)
        elif inside:
            override[match.group("name")] = (index, number)
    return {**top, **override}


def format_number(number, original_text):
    """Write `number` the way the original was written: 2**k stays a power, ints stay ints."""
    if isinstance(number, int):
        if "**" in original_text and number > 0 and number & (number - 1) == 0:
            return f"2**{number.bit_length() - 1}"
        return str(number)
    text = f"{number:.3g}"
    return text if any(c in text for c in ".e") else text + ".0"


def generic_space(active):
    """The search space of a script of the researcher's own, whose settings we know nothing about:
    every positive numeric UPPER_CASE setting moves by a factor (integers stay integers, at least 1),
    within two orders of magnitude; zero and negative ones are left alone."""
    space = {}
    for name, (_, value) in active.items():
        if value > 0:
            space[name] = ("integer", 1, max(2, value * 16)) if isinstance(value, int) else ("factor", value / 100, value * 100)
    return space


def perturb(name, value, rng, space=SEARCH_SPACE):
    """A new value for one setting, within its bounds, or None when it cannot move that way."""
    kind, low, high = space[name]
    if kind == "power_of_two":
        new = int(value * 2) if rng.random() < 0.5 else int(value // 2)
    elif kind == "integer":
        factor = rng.choice(FACTORS)
        new = round(value * factor)
        if new == value:
            new = value + (1 if factor > 1 else -1)
    elif kind == "factor":
        new = float(f"{value * rng.choice(FACTORS):.3g}")
    else:
        new = round(min(high, max(low, value + rng.choice(STEPS))), 4)
    if not low <= new <= high or new == value:
        return None
    return new


def consistent(settings, max_seq_len):
    """The combinations train.py itself refuses or that make no sense."""
    total, device = settings.get("TOTAL_BATCH_SIZE"), settings.get("DEVICE_BATCH_SIZE")
    if total and device and max_seq_len and total % (device * max_seq_len):
        return False  # train.py: TOTAL_BATCH_SIZE must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    return settings.get("WARMUP_RATIO", 0) + settings.get("WARMDOWN_RATIO", 0) <= 1


def random_proposal(train_text, profile, max_seq_len, seed, iteration, tried=(), path="train.py"):
    """One perturbed setting as a proposal {description, hypothesis, patch, key}, or None.

    The draw depends only on (seed, iteration, train.py), so a resumed loop proposes the same
    thing again; `tried` holds the keys of earlier proposals, which are not repeated. `path`: the
    file the text is (an external task's first editable file gets generic_space)."""
    active = active_assignments(train_text, profile)
    space = SEARCH_SPACE if path == "train.py" else generic_space(active)
    names = [name for name in space if name in active]
    if not names:
        return None
    rng = random.Random(f"{seed}:{iteration}")
    settings = {name: number for name, (_, number) in active.items()}
    lines = train_text.splitlines(keepends=True)
    for _ in range(DRAWS):
        name = rng.choice(names)
        index, value = active[name]
        new = perturb(name, value, rng, space)
        if new is None or not consistent(dict(settings, **{name: new}), max_seq_len):
            continue
        match = ASSIGNMENT.match(lines[index].rstrip("\n"))
        text = format_number(new, match.group("value"))
        key = f"{hashlib.sha256(train_text.encode()).hexdigest()[:12]}:{name}={text}"
        if key in tried:
            continue
        lines_after = list(lines)
        ending = "\n" if lines[index].endswith("\n") else ""
        head = f"{match.group('indent')}{name}{match.group('gap')}{text}"
        comment = match.group("comment") or ""
        if comment:  # keep the comment in its column, as the block is aligned
            column = lines[index].index(comment.lstrip())
            comment = " " * max(1, column - len(head)) + comment.lstrip()
        lines_after[index] = head + comment + ending
        old_text = match.group("value").strip()
        change = "raise" if new > value else "lower"
        return {
            "source": "random", "key": key, "description": f"{name} {old_text} -> {text}",
            "hypothesis": f"{change} {name} from {old_text} to {text} (random search, seed {seed}, "
                          f"iteration {iteration}): a neighbour of the best config may train better",
            "patch": "".join(difflib.unified_diff(lines, lines_after, f"a/{path}", f"b/{path}")),
        }
    return None


# ---------------------------------------------------------------------------
# Agent CLIs

AGENTS = ("random", "optuna", "claude", "codex", "opencode", "command")  # optuna: scripts/search.py
LOCAL_BINARIES = common.ROOT / "node_modules" / ".bin"  # claude, codex, opencode: pinned by package-lock.json
ANSWER_KEYS = ("hypothesis", "description")
ANSWER_EXAMPLE = {"hypothesis": "what you changed, what you expect val_bpb to do and why",
                  "description": "a short ledger description, like: matrix lr 0.04 -> 0.05"}
PLAN_EXAMPLE = "the research plan, markdown, at most 30 lines"
# Tools a headless claude may use without asking: reading, and editing (the guard hook in
# .claude/hooks limits edits to train.py and the memory files). No Bash: the loop, not the agent,
# runs the experiment, and an unattended Bash could start a second one.
CLAUDE_TOOLS = "Read,Glob,Grep,Edit,Write"
CLAUDE_INSTALL_TOOLS = "Bash(uv pip install:*),Bash(pip install:*)"
# Codex reads the project's .codex/config.toml (permission profile, guard hook, rules) only in a
# trusted project. A headless run trusts it with -c for that run alone, so the user's own
# ~/.codex/config.toml is never written; hooks need trust of their own, given the same way.
CODEX_CONFIG = common.ROOT / ".codex" / "config.toml"
CODEX_PROFILE = "autoresearch"
# What the helpers write, read-only for the agent too once it exists (the profile in .codex lists
# only what every checkout has: Codex leaves an empty file behind for a path that does not exist).
CODEX_RUNTIME_READ_ONLY = ("results.tsv", "run.log", "runs", ".venv", "node_modules", "PLAN.md", "IDEA.md")
AGENT_RULES = {"codex": CODEX_CONFIG, "opencode": common.ROOT / "opencode.json"}  # what each runs under
NO_INSTALLS = {"codex": "Codex's permission profile keeps the network off and .venv read-only",
               "opencode": "opencode.json refuses pip and uv pip"}


def agent_binary(agent, override=None):
    if override:
        return override
    local = LOCAL_BINARIES / agent
    if agent in ("claude", "codex", "opencode") and local.exists():
        return str(local)
    return agent


def toml_value(value):
    """`value` (a string, or a dict of them) as TOML, for a -c override on Codex's command line."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)} = {toml_value(item)}" for key, item in value.items()) + "}"
    return json.dumps(value)


def codex_overrides():
    """The -c words that give a headless Codex this project's rules: trust for the project (so its
    .codex layer loads: profile, hooks, rules), and the profile's filesystem table with the
    helpers' records and a relocated evaluation cache added."""
    import tomllib  # only here: the other agents never need it

    with open(CODEX_CONFIG, "rb") as handle:
        filesystem = tomllib.load(handle)["permissions"][CODEX_PROFILE]["filesystem"]
    roots = dict(filesystem.get(":workspace_roots", {}))
    # a symlink (run.log points into runs/) cannot be a carve-out: Codex refuses to start
    roots.update({name: "read" for name in CODEX_RUNTIME_READ_ONLY
                  if (common.ROOT / name).exists() and not (common.ROOT / name).is_symlink()})
    filesystem = dict(filesystem, **{":workspace_roots": roots})
    evaluation = common.cache_dir() / "prepared" / "eval"
    if evaluation.is_dir():
        filesystem[f"{evaluation}/*"] = "none"
    trust = {str(common.ROOT): {"trust_level": "trusted"}}
    return ["-c", f"projects={toml_value(trust)}", "--dangerously-bypass-hook-trust",
            "-c", f"permissions.{CODEX_PROFILE}.filesystem={toml_value(filesystem)}"]


def agent_command(agent, prompt, prompt_file, options):
    """(argv, stdin text or None) for one agent call. `options`: agent_bin, agent_command,
    max_turns, allow_install, agent_args (extra words appended, e.g. --model ...)."""
    extra = shlex.split(options.get("agent_args") or "")
    binary = agent_binary(agent, options.get("agent_bin"))
    if agent == "claude":
        tools = CLAUDE_TOOLS + ("," + CLAUDE_INSTALL_TOOLS if options.get("allow_install") else "")
        return [binary, "-p", prompt, "--output-format", "json", "--max-turns", str(options["max_turns"]),
                "--allowedTools", tools, *extra], None
    if agent == "codex":  # no --sandbox (it would switch the profile off), no --full-auto (gone)
        return [binary, "exec", *codex_overrides(), "--color", "never", *extra, prompt], None
    if agent == "opencode":  # opencode.json and its guard plugin apply; no --auto, no --pure
        return [binary, "run", *extra, prompt], None
    if agent == "command":
        words = shlex.split(options["agent_command"])
        uses_prompt = any("{prompt}" in word or "{prompt_file}" in word for word in words)
        argv = [word.replace("{prompt_file}", str(prompt_file)).replace("{prompt}", prompt) for word in words]
        return argv + extra, None if uses_prompt else prompt
    raise ValueError(f"not an agent CLI: {agent}")


def json_objects(text):
    """Every top-level JSON object embedded in `text`, in order."""
    decoder, found, index = json.JSONDecoder(), [], text.find("{")
    while index != -1:
        try:
            value, end = decoder.raw_decode(text, index)
        except ValueError:
            index = text.find("{", index + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        index = text.find("{", end)
    return found


def parse_agent_output(agent, stdout, stderr=""):
    """(answer, meta, error): the agent's {"hypothesis", "description", ...} answer, what its CLI
    reported about the call (cost, turns, errors), and a one-line error when there is no answer."""
    meta, text = {}, stdout
    if agent == "claude":
        envelope = next((obj for obj in reversed(json_objects(stdout)) if obj.get("type") == "result"), None)
        if envelope is None:
            return None, meta, "claude printed no JSON result (expected --output-format json): " + snippet(stdout)
        meta = {"cost_usd": envelope.get("total_cost_usd"), "turns": envelope.get("num_turns"),
                "is_error": envelope.get("is_error"), "subtype": envelope.get("subtype"),
                "duration_ms": envelope.get("duration_ms"), "session_id": envelope.get("session_id")}
        if envelope.get("is_error") or envelope.get("subtype") != "success":
            return None, meta, f"claude ended with {envelope.get('subtype')}: {snippet(envelope.get('result'))}"
        text = str(envelope.get("result") or "")
    answers = [obj for obj in json_objects(text) if all(isinstance(obj.get(key), str) for key in ANSWER_KEYS)
               and obj["hypothesis"] != ANSWER_EXAMPLE["hypothesis"]]  # a CLI that echoes the prompt's example
    if not answers or not " ".join(answers[-1]["description"].split()):
        asked = [line.strip(" !") for line in plain(stderr).splitlines() if "auto-rejecting" in line]
        if agent == "opencode" and asked and not text.strip():
            return None, meta, (f"opencode stopped at a permission it would have to ask for ({snippet(asked[-1])}): "
                                "opencode run rejects it and ends with no answer; allow or deny it in opencode.json")
        return None, meta, ('the answer has no JSON object {"hypothesis": "...", "description": "..."}: '
                            + snippet(text))
    answer = answers[-1]
    answer["description"] = " ".join(answer["description"].split())
    return answer, meta, None


def snippet(text, limit=160):
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text):
    """`text` without terminal colour codes (opencode colours its stderr)."""
    return ANSI_ESCAPE.sub("", str(text or ""))


def last_lines(text, lines=4, limit=400):
    """The end of a failed CLI's stderr, where the error is (the start is often a warning)."""
    kept = [" ".join(line.split()) for line in plain(text).splitlines() if line.strip()][-lines:]
    joined = " | ".join(kept)
    return joined if len(joined) <= limit else "..." + joined[-(limit - 3):]


def installed_packages():
    """The distributions installed in this environment (dist-info folder names): compared before
    and after an agent call, it shows whether the agent installed anything."""
    found = set()
    for folder in {Path(p) for p in sys.path if p.endswith("site-packages")}:
        if folder.is_dir():
            found.update(path.name for path in folder.glob("*.dist-info"))
    return sorted(found)


def which(binary):
    return binary if os.path.sep in binary and os.access(binary, os.X_OK) else shutil.which(binary)


# ---------------------------------------------------------------------------
# The agent's prompt

MAX_SECTION_CHARACTERS = 16000  # program.md and SKILL.md fit whole; a runaway notes.md is cut


def section(title, text):
    text = text.strip()
    if len(text) > MAX_SECTION_CHARACTERS:
        text = "[... earlier part cut ...]\n" + text[-MAX_SECTION_CHARACTERS:]
    return f"## {title}\n\n{text}\n"


def read_text(path):
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def compact_notes(text):
    """notes.md with its sections whole but only the newest part of its Experiment Log, which the
    loop grows by two blocks an iteration."""
    head, marker, log = text.partition("## Experiment Log")
    if len(log) > MAX_SECTION_CHARACTERS // 2:
        log = "\n[... older blocks cut ...]\n" + log[-(MAX_SECTION_CHARACTERS // 2):]
    return head + marker + log


def build_prompt(state, kind, instructions=None, crash=None):
    """One self-contained prompt: the task, the headless contract, the state, the notes, the policy."""
    options, current = state["options"], state["current"]
    import task as task_file  # an external task (autoresearch.toml) names its own files and metric

    external = task_file.load()
    files = " and ".join(external.editable) if external else "train.py"
    metric = external.metric_name if external else "val_bpb"
    rows = common.read_ledger()
    best, baseline = common.best_kept(rows), common.baseline_row(rows)
    plan_first = IDEA_FILE.exists() and not PLAN_FILE.exists()
    answer = json.dumps(dict(ANSWER_EXAMPLE, **({"plan": PLAN_EXAMPLE} if plan_first else {})))
    if kind == "repair":
        task = [f"Experiment {current['number']:04d} (\"{current['proposal']['description']}\") crashed: "
                f"{crash['triage']}: {crash['detail']}",
                *crash.get("excerpt", []),
                f"The end of its log is in {crash['run_dir']}/run.log (read at most 50 lines). {files} is back as "
                "it was when it crashed. Fix the trivial bug (a typo, a shape error) without changing the idea, "
                "and answer with the same JSON object (hypothesis: what you fixed)."]
    else:
        task = [f"Choose ONE experiment and make it by editing {files}: the most promising next idea given "
                "the state and notes below. One hypothesis, the smallest change that tests it."]
        if instructions:
            task = [f"The human queued this experiment for you; make it by editing {files}:\n\n{instructions}"]
        if plan_first:
            task.append("IDEA.md (below) is the research direction. First write a short research plan from it "
                        "and return it in the JSON answer under \"plan\" (the loop saves it as PLAN.md); then make "
                        "the first experiment of that plan.")
        elif PLAN_FILE.exists():
            task.append("Follow PLAN.md (below): take its next step that the notes do not show as done.")
    install = ("You may install a Python package with `uv pip install NAME` if the idea truly needs one; "
               "the loop records it." if options.get("allow_install") else
               "Do not install packages: use what is installed (plain PyTorch).")
    contract = [
        f"- You are one iteration ({current['number']:04d}) of an unattended loop (scripts/loop.py), called "
        "with a fresh context; nobody will answer questions.",
        f"- Edit {files} only (you may also update notes.md). A proposal that changes any other file is "
        "rejected and reset.",
        "- Do not run training, scripts/experiment.py, scripts/decide.py or git: after your answer the loop "
        f"commits {files}, trains it for the fixed budget, records the result and keeps or discards it.",
        f"- {install}",
        f"- Finish within {options['max_turns']} turns. End your reply with one JSON object on its own line:",
        f"  {answer}",
    ]
    if external:
        contract.append(f"- The task is autoresearch.toml's {external.name}: the result is {metric} ({external.direction} "
                        f"is better), read from the run's log by its pattern and self-reported by the script "
                        f"(no referee); a run that breaks a constraint "
                        f"({', '.join(c.name for c in external.constraints) or 'none'}) is never kept.")
    columns = common.ledger_columns()
    recent = "\n".join(common.format_row(row, columns).rstrip("\n") for row in rows[-10:]) or "(no rows yet)"
    status = [f"- session {state['tag']} on {state['branch']}, profile {(common.load_session() or {}).get('profile')}, "
              f"training budget {common.budget_text(common.load_session() or {})}",
              f"- baseline: {metric} {baseline.val_bpb:.6f} ({baseline.commit})" if baseline else "- baseline: not run yet",
              f"- best kept: {metric} {best.val_bpb:.6f} ({best.commit}: {best.description})" if best else "- best: -",
              f"- experiments so far: {max(0, len(common.experiments(rows)) - 1)}",
              "", f"Last ledger rows ({', '.join(columns)}):", "", recent]
    parts = ["# autoresearch: one headless iteration", "", section("Task", "\n".join(task)),
             section("How this works", "\n".join(contract)), section("Where the research stands", "\n".join(status))]
    for title, path in (("IDEA.md (the research direction)", IDEA_FILE), ("PLAN.md", PLAN_FILE)):
        if read_text(path).strip():
            parts.append(section(title, read_text(path)))
    notes = read_text(common.NOTES_FILE)
    if notes.strip():
        parts.append(section("notes.md (your notes from earlier iterations)", compact_notes(notes)))
    preface = ("Written for an interactive session. Here the loop runs setup, experiment, decide and the "
               f"stopping rules for you: your part is the idea and the edit to {files}.\n\n")
    for title, path in (("program.md (the research org's policy)", PROGRAM_FILE),
                        ("The ml-experiment-loop skill (the method)", SKILL_FILE)):
        if read_text(path).strip():
            parts.append(section(title, preface + read_text(path)))
    return "\n".join(parts)
