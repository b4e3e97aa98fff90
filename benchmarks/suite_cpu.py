"""Where the test suite's time goes: wall, CPU seconds, and the CPU by kind of process and by file.

On the 2-core CI box the suite is CPU-bound (both cores 96-100% busy from start to end), so its
wall time is the CPU it burns divided by two: a test file that waits costs little, a file that
starts torch processes costs a lot. This runs the README's test command (extra arguments go to
pytest) and, beside it, reads /proc: the machine's busy time from /proc/stat, and every process's
CPU time every 0.2 s, sorted into kinds by its command line (training, the referee, the helpers,
the agent CLIs, the clusters...). A process that starts and ends between two readings is not
seen: what it used is the line "processes too short to see", the machine's busy time less what
was seen (mostly the helpers, hooks and git calls, 10-100 ms each). Run it with the clusters up
and the variables set as .ci/run does, or the cluster and client tests skip.

Usage:
    uv run benchmarks/suite_cpu.py [PYTEST ARGS...]
"""

import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")

# (kind, pattern on the command line), first match wins: programs by their own name first, then
# Python by the script it runs
KINDS = [
    ("git", r"^\S*/?git "),
    ("bubblewrap (the sandbox)", r"^\S*/?bwrap "),
    ("chromium (the MLflow UI check)", r"^\S*/?chrom"),
    ("agent CLIs (Claude Code, Codex, OpenCode)", r"^\S*(node_modules|/?claude|/?codex|/?opencode)\S* "),
    ("SLURM", r"^\S*/?(slurm\w*|srun|sbatch|scontrol|squeue|scancel|sacct) "),
    ("Ray", r"^(\S*/)?(raylet|gcs_server) |^ray::|^ray-dashboard|site-packages/ray/|/bin/ray "),
    ("referee (prepare.py score)", r"prepare\.py score"),
    ("prepare.py (data)", r"prepare\.py"),
    ("torchrun launcher", r"torch\.distributed\.run"),
    ("training (train.py, DDP ranks)", r"[ /](train|train_two_steps|crash_on_rank_1)\.py( |$)"),
    ("plot.py", r"scripts/plot\.py"),
    ("tracking (tracking.py, the MLflow server)", r"scripts/tracking\.py|mlflow"),
    ("hooks (.claude/hooks)", r"\.claude/hooks"),
    ("helpers (scripts/*.py)", r"scripts/\w+\.py"),
    ("test fixtures (fake trainers, spinners)", r"tests/fixtures|while True"),
    ("pytest and its workers", r"pytest|exec\(eval\(sys\.stdin"),
]


def busy_ticks():
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return user + nice + system + irq + softirq


def read_processes():
    """{(pid, start tick): (command line, CPU seconds so far)} for every process readable now."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        found[(int(entry), int(fields[19]))] = (command.strip() or f"[{name}]", cpu)
    return found


class Watcher(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.before = threading.Event(), read_processes()
        self.seen = {key: [command, cpu] for key, (command, cpu) in self.before.items()}

    def run(self):
        while not self.stop.wait(0.2):
            for key, (command, cpu) in read_processes().items():
                record = self.seen.setdefault(key, [command, 0.0])
                record[1] = cpu
                if not command.startswith("["):  # the program it became after fork (a zombie shows none)
                    record[0] = command

    def by_kind(self):
        totals, counts = collections.Counter(), collections.Counter()
        for key, (command, cpu) in self.seen.items():
            used = cpu - self.before.get(key, ("", 0.0))[1]
            if used <= 0 or key[0] == os.getpid():
                continue
            kind = next((name for name, pattern in KINDS if re.search(pattern, command + " ")), "other")
            totals[kind] += used
            counts[kind] += key not in self.before
        return totals, counts


def per_file(junit):
    seconds, tests = collections.Counter(), collections.Counter()
    for case in ElementTree.parse(junit).iter("testcase"):
        name = case.get("classname", "").replace(".", "/") + ".py"
        seconds[name] += float(case.get("time", 0))
        tests[name] += 1
    return seconds, tests


def main():
    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "junit.xml"
        watcher = Watcher()
        watcher.start()
        busy_before, started, own_before = busy_ticks(), time.monotonic(), time.process_time()
        result = subprocess.run(["uv", "run", "pytest", f"--junitxml={junit}", *sys.argv[1:]], cwd=PROJECT)
        wall, busy = time.monotonic() - started, (busy_ticks() - busy_before) / TICK
        watcher.stop.set()
        watcher.join()
        own = time.process_time() - own_before
        seconds, tests = per_file(junit) if junit.exists() else ({}, {})
    totals, counts = watcher.by_kind()
    cores = len(os.sched_getaffinity(0))
    print(f"\npytest exit code {result.returncode}; wall {wall:.1f} s; the machine busy {busy:.1f} CPU-s "
          f"of {cores * wall:.0f} ({100 * busy / (cores * wall):.0f}% of {cores} cores)")
    print(f"\n{'CPU-s':>8} {'share':>6} {'started':>8}  kind of process")
    for kind, cpu in totals.most_common():
        print(f"{cpu:8.1f} {100 * cpu / busy:5.1f}% {counts[kind]:8d}  {kind}")
    print(f"{own:8.1f} {100 * own / busy:5.1f}% {'':>8}  this benchmark's readings of /proc")
    unseen = busy - sum(totals.values()) - own
    print(f"{unseen:8.1f} {100 * unseen / busy:5.1f}% {'':>8}  processes too short to see (and the kernel)")
    if seconds:
        print(f"\n{'seconds':>8} {'tests':>6}  file (the sum of its tests' times: what its worker spent on it)")
        for name, total in sorted(seconds.items(), key=lambda item: -item[1])[:15]:
            print(f"{total:8.1f} {tests[name]:6d}  {name}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
