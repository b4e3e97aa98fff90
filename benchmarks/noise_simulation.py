"""How many do-nothing changes get kept: upstream's rule ("any lower val_bpb") against ours.

1. One simulated night through the real helpers: a throw-away repository, setup.py measuring the
   noise with its two extra runs, a baseline, then 100 experiments whose true improvement is zero.
   The fake trainer (tests/fixtures/fake_train/noisy.py) returns 1.0 plus seeded Gaussian noise at
   the given floor. Each experiment follows the helpers' `next` step, as the headless loop does:
   decide.py keep, or experiment.py --confirm then keep or discard, or discard. Upstream's rule is
   applied to the same first-run numbers.
2. The same rule (scripts/common.py's verdict) in many simulated nights without processes, for the
   average, and its power: how often a real improvement of 1 to 4 noise units is kept.

Goal: at most 1 false keep in 100 experiments.

Usage:
    uv run benchmarks/noise_simulation.py [--noise-bpb X] [--experiments N] [--nights N]

--noise-bpb defaults to the noise measured in this repository's session (runs/session.json), else
the helpers' default (0.001). The rule is scale-free, so the counts do not depend on it.
"""

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
FAKES = PROJECT / "tests" / "fixtures" / "fake_train"
sys.path.insert(0, str(PROJECT / "scripts"))
import common  # noqa: E402

sys.path.insert(0, str(PROJECT / "tests"))
from repos import commit_new_repository, write_standin_manifest  # noqa: E402  (one recipe with the tests)


def measured_noise():
    session = common.read_json(common.SESSION_FILE) or {}
    return session.get("noise_bpb"), "this repository's session" if session.get("noise_bpb") else None


def helper(repo, env, script, *args):
    result = subprocess.run([sys.executable, f"scripts/{script}.py", *args], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    if result.returncode not in (0, 1, 2):
        sys.exit(f"{script} {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def pending(repo):
    return json.loads((repo / "runs" / "pending.json").read_text())


def night_through_the_helpers(noise, experiments):
    """(our keeps, upstream's keeps, the noise setup measured) for one night of do-nothing changes."""
    with tempfile.TemporaryDirectory() as temporary:
        repo, cache = Path(temporary) / "repo", Path(temporary) / "cache"
        (repo / "scripts").mkdir(parents=True)
        for script in (PROJECT / "scripts").glob("*.py"):
            shutil.copy(script, repo / "scripts")
        shutil.copy(PROJECT / ".gitignore", repo)
        shutil.copy(FAKES / "prepare_standin.py", repo / "prepare.py")
        (repo / "train.py").write_text("DEPTH = 8\n")
        write_standin_manifest(cache, time_budget=60)
        commit_new_repository(repo)
        env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), FAKE_NOISE_BPB=str(noise),
                   AUTORESEARCH_TRAIN_COMMAND=shlex.join([sys.executable, str(FAKES / "noisy.py")]))
        env.pop("AUTORESEARCH_SEED", None)
        helper(repo, env, "setup", "--tag", "zero")
        helper(repo, env, "experiment", "baseline")
        # The baseline is judged on the mean of its run and setup's two; upstream has its one run.
        baseline_first_run = json.loads(next((repo / "runs").glob("0003-*/summary.json")).read_text())["samples"][0]["val_bpb"]
        helper(repo, env, "decide", "keep")
        ours, upstream, upstream_best = 0, 0, baseline_first_run
        for number in range(experiments):
            with open(repo / "train.py", "a") as f:
                f.write(f"IDEA_{number} = {number}  # changes nothing that trains\n")
            helper(repo, env, "experiment", f"idea {number}")
            state = pending(repo)
            first_run = state["val_bpb"]
            if first_run < upstream_best:  # upstream: any lower val_bpb is kept and becomes the best
                upstream, upstream_best = upstream + 1, first_run
            if state["next"] == common.CONFIRM_COMMAND:
                helper(repo, env, "experiment", "--confirm")
                state = pending(repo)
            if state["next"] == common.KEEP_COMMAND:
                ours += helper(repo, env, "decide", "keep").returncode == 0
            else:
                helper(repo, env, "decide", "discard")
        session = json.loads((repo / "runs" / "session.json").read_text())
        return ours, upstream, session["noise_bpb"]


def simulated_night(rng, experiments, improvement=0.0):
    """One night in units of the noise, every change truly better by `improvement`: the same steps
    as the helpers (setup's two noise runs and the baseline estimate the noise and the baseline's
    value; a marginal win gets one more run). Returns (our keeps, upstream's keeps on the same
    first runs; meaningful for improvement 0 only)."""
    baseline = [rng.gauss(0, 1) for _ in range(3)]
    band = max(common.pooled_noise([("start", value) for value in baseline]), common.MIN_NOISE_BPB)
    best, level = statistics.fmean(baseline), 0.0  # level: the true val_bpb of the best code so far
    upstream_best, ours, upstream = baseline[0], 0, 0
    for _ in range(experiments):
        first = level - improvement + rng.gauss(0, 1)
        if first < upstream_best:
            upstream, upstream_best = upstream + 1, first
        value, judged = first, common.verdict(first, best, band, 10, 10)
        if judged == "marginal":
            value = statistics.fmean([first, level - improvement + rng.gauss(0, 1)])
            judged = common.verdict(value, best, band, 10, 10, runs=2)
        if judged in common.KEEP_VERDICTS:
            ours, best, level = ours + 1, value, level - improvement
    return ours, upstream


def main():
    parser = argparse.ArgumentParser(description="False keeps of do-nothing changes: upstream's rule against ours.")
    parser.add_argument("--noise-bpb", type=float, help="the run-to-run spread of val_bpb to simulate "
                        "(default: the session's measured noise, else 0.001)")
    parser.add_argument("--experiments", type=int, default=100, help="experiments per night (default 100)")
    parser.add_argument("--nights", type=int, default=2000, help="simulated nights for the averages (default 2000)")
    args = parser.parse_args()
    noise, source = (args.noise_bpb, "--noise-bpb") if args.noise_bpb else measured_noise()
    if not noise:
        noise, source = common.DEFAULT_NOISE_BPB, "the helpers' default (no measured session here)"
    print(f"noise floor {noise:.6f} (from {source}); rule: one run must win by {common.KEEP_MARGIN_NOISE:g} noise "
          f"units, a marginal win is re-run once and the mean must win by {common.keep_margin(2):.2f}")

    ours, upstream, estimated = night_through_the_helpers(noise, args.experiments)
    print(f"one night through the helpers, {args.experiments} do-nothing experiments (noise measured by setup: "
          f"{estimated:.6f}): upstream's rule keeps {upstream}, ours keeps {ours}")

    rng = random.Random(0)
    nights = [simulated_night(rng, args.experiments) for _ in range(args.nights)]
    mean_ours = statistics.fmean(ours for ours, _ in nights)
    mean_upstream = statistics.fmean(upstream for _, upstream in nights)
    worse = sum(ours >= 2 for ours, _ in nights) / len(nights)
    print(f"{args.nights} simulated nights of {args.experiments}: false keeps per night, upstream {mean_upstream:.2f}, "
          f"ours {mean_ours:.2f} (goal <= 1); nights with 2 or more false keeps: {worse:.1%}")
    power = []
    for units in (1, 2, 3, 4):
        kept = statistics.fmean(simulated_night(rng, 1, improvement=units)[0] for _ in range(args.nights))
        power.append(f"{units} noise: {kept:.0%}")
    print("a real improvement is kept (one experiment, noise estimated at setup): " + ", ".join(power))


if __name__ == "__main__":
    main()
