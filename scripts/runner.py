"""How a training run and the referee are run: in the bubblewrap sandbox, in a process group of their
own, with their compute measured and capped, against the pins recorded at setup.

Used by setup.py, experiment.py and decide.py (and loop.py and lanes.py to stop a process group).
The light part that every helper and the hooks share (paths, the ledger, the keep rule, git, the
session files) is scripts/common.py; this module imports it, never the other way round, so that a
hook that only reads the session does not load the machinery that runs training.

Usage (from another script in scripts/):
    import common
    import runner
    run = runner.train_run(run_dir, common.training_command(), seed, timeout, session)
    runner.score_run(run, run_dir, session, timeout)
"""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from common import (CPU_PROFILES, EVAL_FILES, MODEL_FILE, OUT_DIR, PREPARE_COMMAND, PREPARE_FILE, ROOT, RUNS_DIR, SCRIPTS_DIR,
                    Refusal, eval_dir, is_finite_number, manifest_path, model_path, now_iso, parse_number,
                    parse_summary, pooled_noise, prepared_dir, read_tail, sha256_file, task_pin_problem, triage,
                    is_default_training_command)

# ---------------------------------------------------------------------------
# Files the helpers trust (run.log, referee logs): never written through a link a run planted


def open_trusted(path):
    """A fresh file at `path` for writing (binary): whatever was there, a symbolic link planted by a
    run included, is unlinked first, and the file is created with O_EXCL | O_NOFOLLOW, so writing a
    log never overwrites a file elsewhere."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb")


def append_trusted(path, text):
    """Append text to a file the helpers wrote (never through a symbolic link)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    with os.fdopen(fd, "ab") as f:
        f.write(text.encode("utf-8"))


# ---------------------------------------------------------------------------
# Processes: the tree of a run, read from /proc (Linux), and how it is stopped

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ProcessInfo(NamedTuple):
    parent: int
    group: int
    state: str  # R, S, D, Z (zombie), ...
    cpu_seconds: float  # utime + stime + cutime + cstime: its own CPU time and that of the children it reaped


def process_table():
    """{pid: ProcessInfo} of every process on this machine ({} where there is no /proc)."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                text = f.read().decode("ascii", errors="replace")
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        table[int(name)] = ProcessInfo(int(fields[1]), int(fields[2]), fields[0],
                                       sum(int(value) for value in fields[11:15]) / CLOCK_TICKS)
    return table


def descendants(root, table):
    """`root` and every process below it. In the sandbox's PID namespace an orphan (a daemon that
    called setsid) is re-parented to the namespace's init, which is below `root`: none escapes."""
    children = {}
    for pid, info in table.items():
        children.setdefault(info.parent, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            found.append(pid)
            stack.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(root, table=None):
    """CPU seconds used so far by `root` and all its descendants (live ones, and the dead ones their
    parents reaped): extra worker processes buy no extra compute."""
    table = process_table() if table is None else table
    return sum(table[pid].cpu_seconds for pid in descendants(root, table))


def process_group_alive(pgid):
    """True while a live (not zombie) process remains in the process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    # killpg also reaches zombies nobody has reaped yet; on Linux look at each process's state.
    return any(info.group == pgid and info.state not in ("Z", "X") for info in process_table().values())


KILL_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL: time for training to release the GPU


def _signal_all(pids, number):
    for pid in pids:
        try:
            os.kill(pid, number)
        except (ProcessLookupError, PermissionError):
            pass


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


# ---------------------------------------------------------------------------
# Running a process for a run: output to a file, a hard timeout, its compute measured and capped


class Interrupted(BaseException):
    """The helper itself got SIGTERM or SIGHUP (a tool timeout, a closed terminal)."""


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def _stop_run(process, sandboxed, grace=KILL_GRACE_SECONDS):
    """SIGTERM every process of the run, SIGKILL what is left after `grace`; reaps the run and returns
    os.wait4's (status, usage). In the sandbox the command runs in a session of its own inside a PID
    namespace: SIGTERM goes to the processes inside (so training can release the GPU), and killing
    bwrap at the end takes the whole namespace with it."""
    def alive():
        return [pid for pid in descendants(process.pid, process_table()) if pid != process.pid or not sandboxed]

    _signal_all(alive(), signal.SIGTERM)
    if not sandboxed:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    reaped = None
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            reaped = status, usage
            break
        time.sleep(0.05)
    _signal_all(alive() + ([] if reaped else [process.pid]), signal.SIGKILL)
    if not sandboxed and process_group_alive(process.pid):
        stop_process_group(process.pid, grace=0)
    if reaped is None:
        _pid, status, usage = os.wait4(process.pid, 0)
        reaped = status, usage
    return reaped


POLL_SECONDS = 0.25  # how often the run's compute is read while it runs: the most it can overrun its limit by


def run_logged(command, log_path, env, timeout, on_start=lambda pid: None, compute_limit=None,
               clock="wall_time", sandboxed=False):
    """Run `command` at the root with all output in log_path (a fresh file: an existing one, or a
    symbolic link planted there, is replaced, never followed), in its own process group; the whole
    run is stopped on timeout, on interruption, or once its compute (`clock`: cpu_time of the whole
    process tree, or wall_time) passes compute_limit. on_start(pid) is called once it runs.

    Returns {exit_code, timed_out, interrupted, over_budget, seconds (wall), cpu_seconds, compute_seconds};
    exit code 127 when it cannot start."""
    started = time.monotonic()
    result = {"exit_code": None, "timed_out": False, "interrupted": False, "over_budget": False,
              "seconds": 0.0, "cpu_seconds": 0.0, "compute_seconds": 0.0}
    previous = {number: signal.signal(number, _raise_interrupted) for number in (signal.SIGTERM, signal.SIGHUP)}
    cpu = 0.0
    try:
        try:
            with open_trusted(log_path) as log:
                process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as error:  # the command does not exist or cannot be executed
            with open_trusted(log_path) as log:
                log.write(f"could not start {command}: {error}\n".encode())
            return dict(result, exit_code=127, seconds=time.monotonic() - started)
        usage = None
        try:
            on_start(process.pid)
            pause, scanned = 0.002, started
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    process.returncode = os.waitstatus_to_exitcode(status)
                    break
                now = time.monotonic()
                if now - scanned >= POLL_SECONDS:  # reading /proc costs a few ms: not at every wake-up
                    cpu, scanned = max(cpu, tree_cpu_seconds(process.pid)), now
                if now - started > timeout:
                    result["timed_out"] = True
                    break
                if compute_limit is not None and (cpu if clock == "cpu_time" else now - started) > compute_limit:
                    result["over_budget"] = True
                    break
                time.sleep(pause)
                pause = min(pause * 1.5, POLL_SECONDS)  # a quick fake run ends in milliseconds
        except (Interrupted, KeyboardInterrupt):
            result["interrupted"] = True
        finally:
            if process.returncode is None:
                cpu = max(cpu, tree_cpu_seconds(process.pid))
                status, usage = _stop_run(process, sandboxed)
                process.returncode = os.waitstatus_to_exitcode(status)
            elif not sandboxed and process_group_alive(process.pid):
                # a dataloader worker or a stray child must not outlive the run
                stop_process_group(process.pid)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    seconds = time.monotonic() - started
    if usage is not None:  # everything the run's processes used, once reaped (bwrap's init reaps the namespace)
        cpu = max(cpu, usage.ru_utime + usage.ru_stime)
    compute = cpu if clock == "cpu_time" else seconds
    over = result["over_budget"] or (compute_limit is not None and compute > compute_limit)
    return dict(result, exit_code=process.returncode, seconds=seconds, cpu_seconds=round(cpu, 3),
                compute_seconds=round(compute, 3), over_budget=over)


# ---------------------------------------------------------------------------
# The sandbox (bubblewrap): training runs AI-written code unattended. It sees only what training
# needs, read-only: the system (/usr, a few files of /etc), Python and the venv (whose files are
# hard links into uv's cache: a writable venv would let one run rewrite torch for every later run),
# the repository with runs/ hidden, and prepared/ with prepared/eval/ hidden. It writes only its
# run's out/ folder, plus a fresh HOME and /tmp that vanish with it. No network. In a PID namespace
# of its own: when training exits (or bwrap is killed, or the helper dies) every process of the run
# ends with it, a daemon that called setsid() included. Costs about 10 ms per run.

SANDBOX_HOME = "/home/autoresearch"  # a fresh tmpfs in the sandbox
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "passwd", "group", "nsswitch.conf",
             "hosts", "host.conf", "localtime", "os-release")
GPU_DEVICES = ("/dev/nvidia*", "/dev/dri")
SHARE_VARIABLE = "AUTORESEARCH_SANDBOX_SHARE"  # test harnesses: extra paths bound writable; results are then not verified


def shared_paths():
    """Paths ($AUTORESEARCH_SANDBOX_SHARE, separated by ':') a test harness lets the sandbox write."""
    return [Path(part) for part in os.environ.get(SHARE_VARIABLE, "").split(":") if part]


def python_paths():
    """What running Python needs: the interpreter's installation and the venv."""
    paths = {Path(sys.base_prefix), Path(sys.base_prefix).resolve(), Path(sys.prefix)}
    paths.add(Path(os.path.realpath(sys.executable)).parent.parent)
    # libraries found through LD_LIBRARY_PATH (a container's CUDA driver libraries, say)
    paths.update(Path(part) for part in os.environ.get("LD_LIBRARY_PATH", "").split(":")
                 if part and os.path.isabs(part) and os.path.isdir(part))
    return paths


def _is_within(path, folders):
    return any(path == folder or folder in path.parents for folder in folders)


def _mounts_sorted(mounts):
    """bwrap applies its options in order: a folder's mount before those inside it."""
    return sorted(mounts, key=lambda mount: len(Path(mount[1]).parts))


def bwrap_command(command, readable=(), writable=(), hidden=(), chdir=ROOT, masked=()):
    """`command` wrapped in bwrap with only `readable` (read-only) and `writable` paths visible,
    `hidden` folders covered by an empty tmpfs, `masked` files covered by /dev/null (on a mount
    without devices, so opening one fails), the system and Python read-only, no network."""
    mounts = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            mounts.append(("--symlink", path, os.readlink(path)))
        elif os.path.isdir(path):
            mounts.append(("--ro-bind", path, path))
    mounts += [("--ro-bind", f"/etc/{name}", f"/etc/{name}") for name in ETC_FILES if os.path.exists(f"/etc/{name}")]
    mounts += [("--tmpfs", "/tmp", None), ("--tmpfs", SANDBOX_HOME, None)]
    devices = [path for pattern in GPU_DEVICES for path in glob.glob(pattern)]
    mounts += [("--dev-bind", path, path) for path in devices]
    if devices:  # CUDA and NVML read the GPUs' topology from /sys
        mounts.append(("--ro-bind", "/sys", "/sys"))
    mounts += [("--ro-bind", str(path), str(path)) for path in sorted({*python_paths(), *map(Path, readable)})]
    mounts += [("--tmpfs", str(path), None) for path in hidden]
    mounts += [("--ro-bind", str(path), "/dev/null") for path in masked]
    mounts += [("--bind", str(path), str(path)) for path in [*writable, *shared_paths()]]
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--proc", "/proc", "--dev", "/dev"]
    for option, path, target in _mounts_sorted(mounts):
        if option == "--symlink":
            args += [option, target, path]
        elif option == "--tmpfs":
            args += [option, path]
        else:
            args += [option, target, path]
    for path in hidden:  # empty and read-only: a write there fails as it would in the repository
        args += ["--remount-ro", str(path)]
    return args + ["--remount-ro", "/", "--setenv", "HOME", SANDBOX_HOME, "--setenv", "TMPDIR", "/tmp",
                   "--chdir", str(chdir), "--", *command]


def training_sandbox(command, out_dir, hide_eval=True, task_hidden=()):
    """The training command in the sandbox: the repository (runs/ hidden) and prepared/ (eval/ hidden
    when hide_eval) read-only, out_dir writable. The program and script of a --train-command that lie
    outside the repository (its first two words) are made visible read-only with their folders;
    its other arguments are not. task_hidden: an external task's evaluation-only files and folders
    (autoresearch.toml's `hidden`), emptied for the run."""
    prepared = prepared_dir()
    # the cache at the path training knows it by (bwrap follows a link in a source, not in a target)
    readable = [ROOT] + ([prepared.absolute()] if prepared.is_dir() else [])
    for part in command[:2]:
        if os.path.isabs(part) and os.path.isfile(part):
            path = Path(part).resolve()
            if not _is_within(path, [ROOT, *python_paths()]):
                readable.append(path.parent)
    hidden = [RUNS_DIR] + [path for path in task_hidden if path.is_dir()]
    if hide_eval and eval_dir().is_dir():
        hidden.append(eval_dir().absolute())
    return bwrap_command(command, readable=readable, writable=[Path(out_dir).resolve()], hidden=hidden,
                         masked=[path for path in task_hidden if not path.is_dir()])


def referee_sandbox(command, folder, run_dir):
    """The referee in the sandbox: everything read-only, the prepared data with eval/ visible, its own
    folder (the copy of prepare.py) and the run's out/ folder (the model and its sidecar)."""
    readable = [Path(folder), Path(run_dir).resolve() / OUT_DIR]
    if prepared_dir().is_dir():
        readable.append(prepared_dir().absolute())
    return bwrap_command(command, readable=readable, chdir=folder)


_sandbox_problem = {}


def sandbox_problem():
    """None when the sandbox works here, else why not (one line). Probed once per process."""
    if "answer" in _sandbox_problem:
        return _sandbox_problem["answer"]
    if sys.platform != "linux":
        answer = f"bubblewrap sandboxes are Linux-only (this is {sys.platform})"
    elif not shutil.which("bwrap"):
        answer = "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    else:
        try:
            probe = subprocess.run(bwrap_command(["true"], readable=[ROOT]), cwd=ROOT, capture_output=True, text=True, timeout=30)
            lines = probe.stderr.strip().splitlines()
            answer = None if probe.returncode == 0 else f"bwrap failed: {lines[-1] if lines else probe.returncode}"
        except (OSError, subprocess.TimeoutExpired) as error:
            answer = f"bwrap failed: {error}"
    _sandbox_problem["answer"] = answer
    return answer


def sandbox_state(session):
    """'on', 'off' (the researcher turned it off at setup) or 'unavailable: why'. setup.py records
    which in session.json and says it once; a session recorded as 'on' is probed again per run."""
    recorded = (session or {}).get("sandbox")
    if recorded == "off":
        return "off"
    if recorded == "unavailable":
        return f"unavailable: {session.get('sandbox_problem')}"
    problem = sandbox_problem()
    return f"unavailable: {problem}" if problem else "on"


def compute_clock(session_or_manifest):
    """cpu_time on a CPU profile (where /proc lets the helper add up the process tree), else wall_time."""
    profile = (session_or_manifest or {}).get("profile")
    return "cpu_time" if profile in CPU_PROFILES and Path("/proc/self/stat").exists() else "wall_time"


def eval_exposed():
    """Evaluation files readable in prepared/ itself (an old cache layout), where hiding eval/ hides nothing."""
    return [name for name in EVAL_FILES if (prepared_dir() / name).exists()]


def dispatched(command):
    """Whether the training command sends the run to a cluster (scripts/dispatch.py): its compute is
    spent on another machine, where this helper cannot measure it; here only the dispatcher runs."""
    argv = list(command or [])
    argv = argv[:argv.index("--")] if "--" in argv else argv
    return any(Path(str(part)).name == "dispatch.py" for part in argv)


def protections(session, command=None):
    """What guarded this run, for summary.json: the contract's keys plus train_command and shared.
    compute_measured is none for a run dispatched to a cluster: its limit is the timeout there."""
    sandbox = sandbox_state(session)
    referee = "off" if (session or {}).get("referee") == "off" else "on"
    if (session or {}).get("task") == "external":  # no referee: the task's script scores itself
        return {"task": "external", "sandbox": sandbox, "referee": "off", "eval_hidden": sandbox == "on",
                "pid_namespace": sandbox == "on", "compute_measured": "wall_time", "train_command": "task",
                "shared": [str(path) for path in shared_paths()] if sandbox == "on" else []}
    return {
        "sandbox": sandbox,
        "referee": referee,
        # Without the referee train.py must score itself, so it is shown the evaluation data.
        "eval_hidden": sandbox == "on" and referee == "on" and not eval_exposed(),
        "pid_namespace": sandbox == "on",
        "compute_measured": "none" if dispatched(command) else compute_clock(session),
        "train_command": "default" if command is None or is_default_training_command(command) else "custom",
        "shared": [str(path) for path in shared_paths()] if sandbox == "on" else [],
    }


def is_verified(guards, referee_status):
    """A result is verified only when the referee scored it and no protection was lowered."""
    return bool(referee_status == "verified" and guards.get("sandbox") == "on" and guards.get("eval_hidden")
                and guards.get("pid_namespace") and guards.get("compute_measured") != "none"
                and guards.get("train_command") == "default" and not guards.get("shared"))


# ---------------------------------------------------------------------------
# Pins: prepare.py, the helpers, the hooks and settings, and the whole prepared data, hashed at setup
#
# The train cache can be gigabytes (climbmix): hashing it at every experiment would cost seconds.
# So setup records each prepared file's sha256 with its size, mtime_ns and inode; every experiment
# re-hashes the small files (under PIN_HASH_BYTES: the manifest, tokenizer, token_bytes and, on the
# small profiles, everything) and checks size, mtime_ns and inode of the large ones; a keep and the
# referee's held-out scoring re-hash everything.

PIN_HASH_BYTES = 64 << 20
HOOKS_DIR = ROOT / ".claude" / "hooks"
SETTINGS_FILE = ROOT / ".claude" / "settings.json"


def helper_hashes():
    """sha256 of every helper script, pinned at setup so that a changed helper is noticed."""
    return {path.name: sha256_file(path) for path in sorted(SCRIPTS_DIR.glob("*.py"))}


def protocol_hashes():
    """sha256 of .claude/settings.json and every file of .claude/hooks/ (None for a missing settings file)."""
    hashes = {str(SETTINGS_FILE.relative_to(ROOT)): sha256_file(SETTINGS_FILE) if SETTINGS_FILE.is_file() else None}
    if HOOKS_DIR.is_dir():
        for path in sorted(HOOKS_DIR.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                hashes[str(path.relative_to(ROOT))] = sha256_file(path)
    return hashes


def _file_stamp(path):
    info = os.stat(path)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}


def data_pins():
    """{path relative to prepared/: {sha256, size, mtime_ns, inode}} of every prepared file, eval/ included."""
    folder = prepared_dir()
    if not folder.is_dir():
        return {}
    return {str(path.relative_to(folder)): {"sha256": sha256_file(path), **_file_stamp(path)}
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _data_problem(pins, full):
    folder = prepared_dir()
    present = {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()} if folder.is_dir() else set()
    for name in sorted(set(pins) | present):
        pin, path = pins.get(name), folder / name
        if pin is None or name not in present:
            return name
        if _file_stamp(path)["size"] != pin["size"]:
            return name
        if full or pin["size"] <= PIN_HASH_BYTES:
            if sha256_file(path) != pin["sha256"]:
                return name
        elif _file_stamp(path) != {key: pin[key] for key in ("size", "mtime_ns", "inode")}:
            return name
    return None


def pin_problem(session, data=False):
    """Why prepare.py, a helper, a hook, the settings or (data=True: by size, time and inode where
    large; data="full": every byte) the prepared data no longer match the session's pins, as one line
    naming the way back; None when everything matches."""
    start = session.get("start_commit", "HEAD")[:7]
    if session.get("task") == "external":  # its task file is its protocol (scripts/task.py); no prepare.py
        problem = task_pin_problem(session)
        if problem:
            return problem
    elif not PREPARE_FILE.exists() or sha256_file(PREPARE_FILE) != session["prepare_sha256"]:
        return ("prepare.py no longer matches the hash pinned at setup: the protocol is fixed; "
                f"restore it (git checkout {start} -- prepare.py)")
    pinned = session.get("helper_sha256", {})
    for name in sorted(set(pinned) | {path.name for path in SCRIPTS_DIR.glob("*.py")}):
        path = SCRIPTS_DIR / name
        if name not in pinned:
            return f"scripts/{name} was not there at setup: the helpers are fixed; remove it"
        if not path.exists() or sha256_file(path) != pinned[name]:
            return (f"scripts/{name} no longer matches the hash pinned at setup: restore it "
                    f"(git checkout {start} -- scripts/{name})")
    if "protocol_sha256" in session:
        now = protocol_hashes()
        for name in sorted(set(now) | set(session["protocol_sha256"])):
            if now.get(name) != session["protocol_sha256"].get(name):
                return (f"{name} no longer matches the hash pinned at setup: the hooks and settings are the "
                        f"human's; restore it (git checkout {start} -- {name})")
    if data and "data_pins" in session:
        name = _data_problem(session["data_pins"], full=data == "full")
        if name:
            return (f"the prepared data's {name} no longer matches the hash pinned at setup: the data changed; "
                    f"prepare it again ({PREPARE_COMMAND}) and start a new session")
    return None


def check_pins(session, data=False):
    problem = pin_problem(session, data)
    if problem:
        raise Refusal(problem)


# ---------------------------------------------------------------------------
# The referee: prepare.py scores the model every run saved, in a process of its own that never
# imports train.py: `python -I` on a copy of the pinned prepare.py in an empty temporary folder
# (so nothing of the repository, such as an untracked numpy.py, can be imported), in the sandbox
# with everything read-only. The number that decides is the referee's; train.py's is informational.

# On CPU (float32) the two numbers agree to about 1e-6; on CUDA both use bf16 autocast but may
# pick different kernels. A result is judged on the referee's number anyway, so a tamper smaller
# than this gains nothing; a larger disagreement is evidence of one.
REFEREE_TOLERANCE_BPB = 5e-4
INVALID_PREFIX = "invalid:"  # prepare.py's line when the artifact is refused or not causal (exit code 4)
INVALID_EXIT_CODE = 4


def invalid_line(log_tail):
    """prepare.py's `invalid: ...` line in a log, or None."""
    lines = [line.strip() for line in log_tail.splitlines() if line.startswith(INVALID_PREFIX)]
    return lines[-1] if lines else None


GOLF_LIMIT_BYTES = 16_000_000  # parameter golf: code plus compressed model, decimal (prepare.py's too)


def golf_session(session):
    """Parameter golf on this repository's train.py (setup.py --golf): the referee scores the model
    after the challenge's int8+zlib round trip, and a keep needs the artifact under the limit."""
    return (session or {}).get("task") == "golf"


def committed_train_py():
    """train.py's bytes at HEAD (the commit under test): what a golf artifact's code counts, whatever
    a run left in the work tree."""
    shown = subprocess.run(["git", "show", "HEAD:train.py"], cwd=ROOT, capture_output=True)
    if shown.returncode != 0:
        raise Refusal("git show HEAD:train.py failed: " + shown.stderr.decode(errors="replace").strip()[:200])
    return shown.stdout


def score_saved_model(run_dir, split, session, timeout, label=None):
    """Score run_dir/out/model.pt2 on `split` with a fresh copy of the pinned prepare.py; in a golf
    session, after the int8+zlib round trip, with the artifact's size (train.py at HEAD plus the
    compressed model) in "artifact_bytes".

    Returns {"status": "scored" | "invalid" | "failed", "bpb", "detail", "seconds", "log"}:
    invalid when the saved model is refused or fails the causality probe, or the protocol or data
    changed; failed when there is nothing to score or prepare.py could not score it."""
    run_dir = Path(run_dir)
    model = model_path(run_dir)
    log = run_dir / f"referee-{label or split}.log"
    result = {"status": "failed", "bpb": None, "detail": None, "seconds": 0.0,
              "log": str(log.relative_to(ROOT)) if ROOT in log.parents else str(log)}
    problem = pin_problem(session, data="full" if split == "test" else True)
    if problem:
        return dict(result, status="invalid", detail=problem)
    if model.is_symlink() or not model.is_file():
        return dict(result, detail=f"no {MODEL_FILE} in the run folder")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AUTORESEARCH_EXPORT", "PYTHON"))}
    env.update(PYTHONUNBUFFERED="1", AUTORESEARCH_PROFILE=str(session.get("profile") or ""),
               AUTORESEARCH_DATASET=str(session.get("dataset") or ""))
    with tempfile.TemporaryDirectory(prefix="autoresearch-referee-") as folder:
        copy = Path(folder) / "prepare.py"
        shutil.copyfile(PREPARE_FILE, copy)
        if sha256_file(copy) != session["prepare_sha256"]:  # checked on the copy that runs
            return dict(result, status="invalid", detail="prepare.py no longer matches the hash pinned at setup")
        os.chmod(folder, 0o755)
        command = [sys.executable, "-I", str(copy), "score", str(model), "--split", split]
        if golf_session(session):
            code = Path(folder) / "train.py"
            code.write_bytes(committed_train_py())
            command += ["--int8-zlib", "--code", str(code)]
        sandboxed = sandbox_state(session) == "on"
        if sandboxed:
            command = referee_sandbox(command, folder, run_dir)
        run = run_logged(command, log, env, timeout, sandboxed=sandboxed)
    tail = read_tail(log, 1 << 16)
    result["seconds"] = round(run["seconds"], 3)
    if run["exit_code"] == INVALID_EXIT_CODE and invalid_line(tail):
        return dict(result, status="invalid", detail=invalid_line(tail))
    match = re.search(rf"^{split}_bpb:\s*(\S+)\s*$", tail, re.MULTILINE)
    if run["exit_code"] != 0 or run["timed_out"] or not match:
        why = triage(tail, run["exit_code"], run["timed_out"], timeout)["detail"]
        return dict(result, detail=f"prepare.py score failed: {why}")
    bpb = parse_number(match.group(1))
    if not is_finite_number(bpb):
        return dict(result, detail=f"prepare.py score printed {match.group(1)!r}")
    if golf_session(session):
        size = re.search(r"^artifact_bytes:\s*(\d+)\s*$", tail, re.MULTILINE)
        if not size:
            return dict(result, detail="prepare.py score printed no artifact_bytes after the int8+zlib round trip")
        result["artifact_bytes"] = int(size.group(1))
    return dict(result, status="scored", bpb=bpb)


def referee_verdict(claimed, scored, golf=False):
    """Compare train.py's number (None when it could not evaluate: the sandbox hides the evaluation
    data) with the referee's score of the same run: the referee entry of a sample, with status
    verified, invalid or unverified. In golf the referee scores the round-tripped model, which
    train.py never saw: its number stands alone."""
    if scored["status"] == "invalid":
        return {**scored, "status": "invalid", "claimed": claimed}
    if scored["status"] != "scored":
        return {**scored, "status": "unverified", "claimed": claimed}
    if not golf and is_finite_number(claimed) and abs(scored["bpb"] - claimed) > REFEREE_TOLERANCE_BPB:
        return {**scored, "status": "invalid", "claimed": claimed,
                "detail": f"train.py printed val_bpb {claimed:.6f}, but the referee scored its saved model "
                          f"{scored['bpb']:.6f}"}
    return {**scored, "status": "verified", "claimed": claimed}


def delete_saved_models(run_dirs):
    """Free the disk (about 200 MB per model on the H100 profile) of runs that were not kept."""
    for run_dir in run_dirs:
        for name in (MODEL_FILE, Path(MODEL_FILE).with_suffix(".json").name):
            path = ROOT / run_dir / OUT_DIR / name
            if path.is_file() or path.is_symlink():
                path.unlink()


# ---------------------------------------------------------------------------
# One training run: an experiment, its confirmation, or a noise run

# Start-up, evaluation and export come on top of the training budget (importing torch and exporting
# the model alone take seconds, whatever the budget). Setup measures them on the baseline (the
# human's code: its compute minus the budget); a run may use the budget plus ALLOWANCE_FACTOR x that
# overhead plus ALLOWANCE_SLACK of the budget, never more than allowance_cap(budget). Until measured,
# the cap applies.
ALLOWANCE_FACTOR = 1.5
ALLOWANCE_SLACK = 0.1
ALLOWANCE_MIN_SECONDS = 0.5
# Five minutes: on a slow 2-core VM (`sum(range(10**7))` in 3 s, not 0.15) the baseline's own start-up
# and export took 100 to 125 CPU-s for a 5 s budget, so a cap of two minutes stopped the human's code.
ALLOWANCE_MAX_SECONDS = 300.0


def allowance_cap(budget):
    """The most compute beyond the budget any run may use: the budget again, or five minutes if more."""
    return max(float(budget), ALLOWANCE_MAX_SECONDS)


def allowance_from(overheads, budget):
    """The allowance (seconds) for the measured overheads (compute minus budget) of baseline runs."""
    worst = max(max(overheads), 0.0)
    return round(min(allowance_cap(budget),
                     max(ALLOWANCE_MIN_SECONDS, ALLOWANCE_FACTOR * worst + ALLOWANCE_SLACK * budget)), 3)


# On a token budget (the cpu profiles) train.py trains the same tokens on any machine, so the budget
# itself costs no fixed number of seconds. What stops an experiment that buys compute (more tokens,
# a bigger model, extra processes) is a ceiling on its measured compute: TOKEN_CEILING x the most the
# human's baseline used at setup, start-up and export included. 1.5 keeps an honest run clear of the
# machine's drift (the same baseline took 113 to 133 CPU-s in one hour of this 2-core VM) and gives
# an experiment about the headroom the allowance gives on a time budget (90 s + 1.5 x overhead + 9 s).
TOKEN_CEILING = 1.5


def compute_limit(session, processes=1):
    """Seconds of compute (cpu or wall) a run may use. On a token budget: TOKEN_CEILING x the most a
    baseline run used, more in proportion when a run has more processes than those baselines (each
    pays its own start-up). On a time budget: the budget plus the session's allowance, once per
    process that pays the start-up (`processes`: on the CPU clock, each rank under torchrun and
    torchrun itself import torch and the ranks each export; train.py shares the budget among the
    ranks). Until the baseline is measured, the budget plus allowance_cap."""
    session = session or {}
    budget, peak = session.get("time_budget"), baseline_peak(session)
    if peak is not None:
        scale = max(1.0, processes / session.get("baseline_processes", 1))
        return round(TOKEN_CEILING * peak * scale, 3)
    if not is_finite_number(budget):
        return None
    allowance = session.get("allowance_s")
    return budget + processes * (allowance if is_finite_number(allowance) else allowance_cap(budget))


def baseline_peak(session):
    """On a token budget, the most compute a baseline run used; None on a time budget or until measured."""
    measured = session.get("baseline_compute_s")
    return max(measured) if session.get("train_tokens") and measured else None


def record_baseline(session, run):
    """Record what a baseline run (the human's code) used: on a token budget its compute, which sets
    the ceiling; on a time budget its overhead (compute beyond the budget), which sets the allowance."""
    budget = session.get("time_budget")
    if not run.get("compute_seconds") or run.get("clock") == "none":
        return
    if session.get("train_tokens"):
        session.setdefault("baseline_compute_s", []).append(round(run["compute_seconds"], 3))
        session["baseline_processes"] = run.get("processes", 1)
    elif is_finite_number(budget):
        session.setdefault("overheads_s", []).append(round(run["compute_seconds"] - budget, 3))
        session["allowance_s"] = allowance_from(session["overheads_s"], budget)


def limit_text(session, limit, of=""):
    """What the limit a run went past was made of, for the invalid verdict's line."""
    budget, peak = session.get("time_budget"), baseline_peak(session)
    if peak is not None:
        return f"{TOKEN_CEILING:g} x the {peak:.1f} s the baseline used at setup{of}"
    return f"{budget:g} s budget + {limit - budget:.1f} s for start-up, evaluation and export{of}"


def train_run(run_dir, command, seed, timeout, session, on_start=lambda pid: None, ranks=1, task=None):
    """Train once with output in run_dir/run.log and the model saved to run_dir/out/model.pt2, in the
    sandbox when the session allows it, with the compute measured by this helper and capped at the
    budget plus the session's allowance. Returns {status: ok | crash | invalid, val_bpb (what
    train.py printed, None under the sandbox), metrics, failure (triage, or None), exit_code,
    timed_out, interrupted, wall_seconds, compute_seconds, compute_limit_s, clock, protections, sandbox}.
    ranks > 1: the default command under torchrun, whose processes each pay the start-up on the CPU clock.
    task (scripts/task.py, an external task): its metric and constraints are read from the log with its
    patterns, its hidden files are hidden, and a broken constraint makes the run `constraint`."""
    run_dir = Path(run_dir)
    run_log = run_dir / "run.log"
    out = run_dir / OUT_DIR
    out.mkdir(exist_ok=True)
    guards = protections(session, command)
    env = {key: value for key, value in os.environ.items() if not key.startswith("AUTORESEARCH_EXPORT")}
    env.update(AUTORESEARCH_SEED=str(seed), PYTHONUNBUFFERED="1", AUTORESEARCH_EXPORT=str(out / MODEL_FILE),
               AUTORESEARCH_PROFILE=str(session.get("profile") or ""),
               AUTORESEARCH_DATASET=str(session.get("dataset") or ""))
    if task and task.seed_env:
        env[task.seed_env] = str(seed)
    if guards["compute_measured"] == "cpu_time":
        # Threads waiting for work sleep instead of spinning: a spin burns CPU time, the budget's clock
        # here, and spins longest when the machine is loaded, which would cost steps under load.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sandboxed = guards["sandbox"] == "on"
    if sandboxed:  # compiler caches in the sandbox's own /tmp: nothing a run writes reaches the next one
        env.update(TORCHINDUCTOR_CACHE_DIR="/tmp/inductor", TRITON_CACHE_DIR="/tmp/triton")
    wrapped = training_sandbox(command, out, hide_eval=guards["referee"] == "on",
                               task_hidden=task.hidden_paths() if task else ()) if sandboxed else command
    clock = guards["compute_measured"]
    processes = ranks + 1 if ranks > 1 and clock == "cpu_time" else 1
    limit = None if clock == "none" else compute_limit(session, processes)
    run = run_logged(wrapped, run_log, env, timeout, on_start, compute_limit=limit, clock=clock, sandboxed=sandboxed)
    tail = read_tail(run_log)
    finished = run["exit_code"] == 0 and not run["timed_out"] and not run["interrupted"] and not run["over_budget"]
    if task:  # the metric under its own name, then the constraints, as the task's patterns read them
        value = task.read_metric(tail) if finished else None
        metrics = {task.metric_name: value, **task.read_constraints(tail)} if value is not None else {}
    else:
        metrics = parse_summary(tail) if finished else {}
        value = metrics.get("val_bpb") if is_finite_number(metrics.get("val_bpb")) else None
    val_bpb = value
    status, failure = "ok", None
    tampered = pin_problem(session, data=True)  # without the sandbox, training could have rewritten the referee
    if run["interrupted"]:
        status, failure = "crash", {"kind": "interrupted", "detail": "the helper was interrupted; training was stopped",
                                    "excerpt": []}
    elif run["over_budget"]:
        what = "CPU time of its processes" if clock == "cpu_time" else "wall time"
        of = f" of {ranks} ranks and torchrun" if ranks > 1 and clock == "cpu_time" else ""
        status, failure = "invalid", {"kind": "over_budget", "excerpt": [], "detail": (
            f"trained past the budget: {run['compute_seconds']:.1f} s of {what} measured, more than the "
            f"{limit:.1f} s allowed ({limit_text(session, limit, of)})")}
    elif tampered:
        status, failure = "invalid", {"kind": "tampering", "detail": f"after training, {tampered}", "excerpt": []}
    elif run["exit_code"] == INVALID_EXIT_CODE and invalid_line(tail):
        status, failure = "invalid", {"kind": "causality", "detail": invalid_line(tail), "excerpt": []}
    elif not metrics:
        status, failure = "crash", triage(tail, run["exit_code"], run["timed_out"], timeout)
        if task and failure["kind"] == "no_summary":
            failure["detail"] = (f"exit code {run['exit_code']}, no finite number matched the metric's "
                                 f"pattern ({task.metric_pattern.pattern})")
    elif task and task.violations(metrics):
        status, failure = "constraint", {"kind": "constraint", "detail": "; ".join(task.violations(metrics)),
                                         "excerpt": []}
    elif "val_bpb" in metrics and val_bpb is None and metrics["val_bpb"] != "none":
        status, failure = "crash", {"kind": "fast_fail", "detail": f"val_bpb is {metrics['val_bpb']}", "excerpt": []}
    return {"status": status, "val_bpb": val_bpb if status in ("ok", "constraint") else None, "metrics": metrics,
            "failure": failure, "exit_code": run["exit_code"], "timed_out": run["timed_out"],
            "interrupted": run["interrupted"], "wall_seconds": round(run["seconds"], 3),
            "cpu_seconds": run["cpu_seconds"], "compute_seconds": run["compute_seconds"], "clock": clock,
            "compute_limit_s": limit, "processes": processes, "protections": guards, "sandbox": guards["sandbox"],
            "run_log": str(run_log.relative_to(ROOT))}


def score_run(run, run_dir, session, timeout):
    """The referee's verdict on a finished run (train_run's result, updated in place): run["referee"]
    is the sample's referee entry, run["value"] the number that counts (the referee's; train.py's only
    when the referee is off or could not score it), run["self_reported"] whether it is train.py's.
    A run with no number at all, or whose saved model is refused, stops being "ok"."""
    run.update(referee=None, value=run["val_bpb"], self_reported=True)
    if run["status"] != "ok":
        return run
    if session.get("referee") == "off":
        if run["val_bpb"] is None:
            run.update(status="crash", failure={"kind": "no_summary", "excerpt": [],
                                                "detail": "train.py printed no val_bpb and the referee is off"})
        return run
    verdict = referee_verdict(run["val_bpb"], score_saved_model(run_dir, "val", session, timeout),
                              golf=golf_session(session))
    run["referee"] = verdict
    if verdict["status"] == "verified":
        run.update(value=verdict["bpb"], self_reported=False)
        append_trusted(run_dir / "run.log", f"---\nreferee:          {verdict['log']}\n"
                                            f"val_bpb:          {verdict['bpb']:.6f}\n")
    elif verdict["status"] == "invalid":
        run.update(status="invalid", failure={"kind": "referee", "detail": verdict["detail"], "excerpt": []})
    elif run["val_bpb"] is None:  # unverified, and train.py could not evaluate: no number at all
        run.update(status="crash", failure={"kind": "unscored", "detail": verdict["detail"], "excerpt": []})
    return run


def new_run_dir(commit):
    """runs/<NNNN>-<commit7>/, created; every run (experiment, confirmation, noise) gets its own."""
    run_dir = RUNS_DIR / f"{next_run_number():04d}-{commit[:7]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def default_timeout(manifest):
    """Twice the prepared time budget plus a margin for start-up, compilation and evaluation."""
    budget = manifest.get("time_budget")
    if not is_finite_number(budget):
        raise Refusal(f"{manifest_path()} has no time_budget: pass --timeout SECONDS")
    return 2 * budget + TIMEOUT_MARGIN_SECONDS


TIMEOUT_MARGIN_SECONDS = 120

# ---------------------------------------------------------------------------
# Run folders and noise samples: the same commit re-run under other seeds


def record_noise_sample(session, run, commit, seed, val_bpb):
    """Add one run to the session's noise samples (a seed already sampled for that commit adds
    nothing: same seed, same number) and recompute noise_bpb. Returns True when it was added."""
    samples = session.setdefault("noise_runs", [])
    if any(sample["commit"] == commit and sample["seed"] == seed for sample in samples):
        return False
    samples.append({"run": run, "commit": commit, "seed": seed, "val_bpb": val_bpb})
    session["noise_bpb"] = pooled_noise([(sample["commit"], sample["val_bpb"]) for sample in samples])
    session["noise_measured_at"] = now_iso()
    return True


def next_seed(used, start):
    seed = start
    while seed in used:
        seed += 1
    return seed


def next_run_number():
    """1 + the highest NNNN among runs/<NNNN>-<commit7>/ (interrupted runs keep their number)."""
    numbers = [int(path.name[:4]) for path in RUNS_DIR.glob("[0-9][0-9][0-9][0-9]-*")]
    return max(numbers, default=0) + 1
