"""What the experiment helpers cost around one experiment, and what a flood of output costs the console.

Builds a throw-away git repository with a copy of scripts/ and a trivial training script, then
times experiment.py + decide.py (commit, launch in the sandbox, wait, parse, write summary, record the row,
reset) for several experiments and subtracts the time the training script takes on its own.
Target: under 0.5 s per experiment. Then runs a training script that prints 50 MB and counts
the bytes experiment.py put on the console (limit: 300).

Usage:
    uv run benchmarks/helpers_overhead.py [--experiments N]
"""

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
FAKES = PROJECT / "tests" / "fixtures" / "fake_train"
sys.path.insert(0, str(PROJECT / "tests"))
from repos import commit_new_repository, write_standin_manifest  # noqa: E402  (one recipe with the tests)


def timed(command, cwd, env):
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode not in (0, 1):
        sys.exit(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return time.perf_counter() - started, result


def make_repository(root):
    repo, cache = root / "repo", root / "cache"
    shutil.copytree(PROJECT / "scripts", repo / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / ".gitignore", repo)
    shutil.copy(FAKES / "prepare_standin.py", repo / "prepare.py")  # scores the fakes' "models" without torch
    (repo / "train.py").write_text("LR = 0.04\n")
    write_standin_manifest(cache, time_budget=60)
    commit_new_repository(repo)
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
    return repo, env


def main():
    parser = argparse.ArgumentParser(description="Time the helpers around one experiment.")
    parser.add_argument("--experiments", type=int, default=10, help="experiments to time (default 10)")
    args = parser.parse_args()
    python = sys.executable
    train = [python, str(FAKES / "success.py")]
    with tempfile.TemporaryDirectory() as temporary:
        repo, env = make_repository(Path(temporary))
        env["AUTORESEARCH_TRAIN_COMMAND"] = shlex.join(train)
        timed([python, "scripts/setup.py", "--tag", "bench", "--noise-runs", "0"], repo, env)
        training = statistics.median(timed(train, repo, env)[0] for _ in range(args.experiments))
        experiment_times, decide_times = [], []
        for number in range(args.experiments):
            with open(repo / "train.py", "a") as f:
                f.write(f"IDEA = {number}\n")  # so that every experiment commits a change of code
            seconds, _ = timed([python, "scripts/experiment.py", f"idea {number}"], repo, env)
            experiment_times.append(seconds)
            seconds, _ = timed([python, "scripts/decide.py", "keep" if number == 0 else "discard"], repo, env)
            decide_times.append(seconds)
        experiment_s, decide_s = statistics.median(experiment_times), statistics.median(decide_times)
        overhead = experiment_s - training + decide_s
        print(f"helpers overhead per experiment (commit, launch, parse, record, reset): {overhead:.3f} s, "
              f"median of {args.experiments} (target < 0.5 s)")
        print(f"  experiment.py {experiment_s:.3f} s including {training:.3f} s for the trivial training "
              f"script itself; decide.py discard {decide_s:.3f} s")

        with open(repo / "train.py", "a") as f:
            f.write("IDEA = 'flood'\n")
        flood = shlex.join([python, str(FAKES / "flood.py"), "50"])
        seconds, result = timed([python, "scripts/experiment.py", "flood", "--train-command", flood], repo, env)
        console = len(result.stdout.encode()) + len(result.stderr.encode())
        log_mib = (repo / "run.log").stat().st_size / 2**20
        print(f"console bytes for a {log_mib:.0f} MiB flood: {console} (limit 300), experiment.py took {seconds:.2f} s")

    if shutil.which("uv"):
        bare = statistics.median(timed([python, "-c", "pass"], PROJECT, os.environ)[0] for _ in range(5))
        launched = statistics.median(timed(["uv", "run", "--no-sync", "python", "-c", "pass"], PROJECT,
                                           os.environ)[0] for _ in range(5))
        print(f"  not counted above: `uv run` adds {launched - bare:.3f} s per command as a launcher")


if __name__ == "__main__":
    main()
