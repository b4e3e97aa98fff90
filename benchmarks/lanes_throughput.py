"""Experiments per hour with 1, 2 and 4 lanes on each backend, and the dispatch overhead per run.

For each backend that is up (local always; slurm when sinfo answers, e.g. after
scripts/cluster/slurm_local.sh up; ray when the Jobs API answers at $RAY_ADDRESS, e.g. after
scripts/cluster/ray_local.sh up), it starts 1, 2 and 4 lanes with scripts/lanes.py in a temporary
repository, each running the baseline plus --experiments experiments of the fake training script
tests/fixtures/cluster/lane_train.py, which takes --seconds per run: the ideal is lanes x 3600 /
seconds per hour, and linear in the lanes. The random proposer, the helpers and decide.py run
for real (no noise runs, no referee: the fake saves no model).

Then the dispatch overhead of one run per backend, measured around scripts/dispatch.py itself
(a run of 0 s, five times): from starting the command to the training process starting, and from
the training process ending to the command returning with its exit code, after which
experiment.py and decide.py add their own fixed cost (benchmarks/helpers_overhead.py).

Usage:
    uv run benchmarks/lanes_throughput.py [--seconds 5] [--experiments 3] [--lanes 1,2,4] [--backends local,slurm,ray]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))
from lanes_repo import FAKE_LOOP, FAKE_TRAIN, LanesRepo, ray_up, slurm_up  # noqa: E402

PASS_THROUGH = ["--env", "FAKE_TRACE", "--env", "FAKE_SECONDS"]  # ray jobs get only what is named


def throughput(backend, lanes, seconds, experiments):
    """(experiments per hour, experiments recorded, wall seconds) for `lanes` lanes."""
    with tempfile.TemporaryDirectory() as folder:
        repo = LanesRepo(Path(folder) / "repo", fake_seconds=seconds)
        extra = PASS_THROUGH if backend == "ray" else []
        started = time.monotonic()
        repo.lanes("start", str(lanes), "--backend", backend, "--tag", "bench", "--train-command", FAKE_TRAIN, *extra,
                   "--", *FAKE_LOOP, "--max-experiments", str(experiments), "--timeout", str(seconds * 4 + 120))
        status = repo.wait_until_stopped(timeout=600)
        wall = time.monotonic() - started
        return status["experiments"] / wall * 3600, status["experiments"], wall


def dispatch_overhead(backend, runs=5):
    """Median seconds (start to training, training end to return) of one run through `backend`."""
    with tempfile.TemporaryDirectory() as folder:
        repo = LanesRepo(Path(folder) / "repo", fake_seconds=0)
        if backend == "local":
            command = FAKE_TRAIN.split()
        else:
            command = [sys.executable, "scripts/dispatch.py", "--backend", backend,
                       *(PASS_THROUGH if backend == "ray" else []), "--", *FAKE_TRAIN.split()]
        before, after = [], []
        for number in range(runs):
            env = dict(repo.env, AUTORESEARCH_SEED=str(number))  # a new run each time, as a confirmation is
            started = time.time()
            result = subprocess.run(command, cwd=repo.path, env=env, capture_output=True, text=True)
            ended = time.time()
            assert result.returncode == 0, result.stdout + result.stderr
            trace = [run for run in repo.traces() if run["event"] == "run"][-1]
            before.append(trace["start"] - started)
            after.append(ended - trace["end"])
        return statistics.median(before), statistics.median(after)


def main():
    parser = argparse.ArgumentParser(description="Lanes throughput and dispatch overhead per backend.")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each fake training run (default 5)")
    parser.add_argument("--experiments", type=int, default=3, help="experiments per lane after the baseline (default 3)")
    parser.add_argument("--lanes", default="1,2,4", help="lane counts to measure (default 1,2,4)")
    parser.add_argument("--backends", default="local,slurm,ray", help="backends to measure, when up")
    args = parser.parse_args()
    up = {"local": True, "slurm": slurm_up(), "ray": ray_up()}
    backends = [name for name in args.backends.split(",") if up.get(name)]
    skipped = [name for name in args.backends.split(",") if not up.get(name)]
    print(f"fake training {args.seconds:g} s per run, baseline + {args.experiments} experiments per lane; "
          f"ideal {3600 / args.seconds:.0f}/h per lane" + (f"; not up: {', '.join(skipped)}" if skipped else ""))
    results = {}
    for backend in backends:
        for lanes in [int(n) for n in args.lanes.split(",")]:
            rate, count, wall = throughput(backend, lanes, args.seconds, args.experiments)
            results[(backend, lanes)] = rate
            base = results.get((backend, 1))
            scaling = f", x{rate / base:.2f} of 1 lane" if base and lanes > 1 else ""
            print(f"{backend:5} {lanes} lane(s): {rate:7.0f} experiments/h ({count} in {wall:.1f} s{scaling})")
    for backend in backends:
        before, after = dispatch_overhead(backend)
        print(f"{backend:5} dispatch overhead per run: {before:.2f} s submit -> training starts, "
              f"{after:.2f} s training ends -> exit code back (median of 5)")
    print(json.dumps({f"{backend}/{lanes}": round(rate, 1) for (backend, lanes), rate in results.items()}))


if __name__ == "__main__":
    main()
