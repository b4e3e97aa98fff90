"""Random search against TPE and CMA-ES (the Optuna proposer) on the same budget of experiments.

1. The bowl (default): the fake trainer tests/fixtures/fake_train_loop/bowl.py scores train.py's
   settings as 1 + 0.05 x the squared log-distance of each from a known optimum, plus seeded noise
   (0.0002). Each proposer's own code proposes (proposers.random_proposal, which the loop keeps
   only when it beats the best; search.ask on an in-memory study, with the baseline as its first
   trial, as the loop does), the bowl's formula scores the proposal: no processes, so 20 seeds x
   30 experiments x 3 proposers take about two minutes. Regret: the noise-free value of the best
   configuration found (the incumbent a human would keep) minus the bowl's minimum (1.0).
2. --real N: the real cpu profile, N experiments per proposer, each a `loop.py start` in its own
   copy of this repository (needs `uv run prepare.py --dataset builtin --profile cpu` done, and
   about N x 3 x 2 minutes). It reports each proposer's best val_bpb against its baseline.

Target on the bowl: TPE reaches random search's final regret in at most half the experiments.

Usage:
    uv run --group search benchmarks/search_effectiveness.py [--seeds 20] [--experiments 30]
    uv run --group search benchmarks/search_effectiveness.py --real 8
"""

import argparse
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "fake_train_loop"))
import bowl  # noqa: E402
import proposers  # noqa: E402
import search  # noqa: E402

PROFILE, MAX_SEQ_LEN = "cpu", 256  # the loop tests' manifest
CHECKPOINTS = (10, 15, 20, 30)  # 15: half the budget, where the target is judged


def true_value(text):
    """The bowl's val_bpb without noise (its loss term, as bowl.main computes it)."""
    config = bowl.settings(text, PROFILE)
    return 1.0 + sum(bowl.WEIGHT * math.log(config[name] / best) ** 2
                     for name, best in bowl.OPTIMUM.items() if config.get(name, 0) > 0)


def observed(text, rng):
    return true_value(text) + rng.gauss(0, 0.0002)


def run_random(text, seed, experiments):
    """The loop's random proposer: perturb the best kept train.py, keep a proposal only if it is lower."""
    rng = random.Random(f"noise:{seed}")
    best_text, best_seen, tried, regrets = text, observed(text, rng), [], []
    for iteration in range(1, experiments + 1):
        proposal = proposers.random_proposal(best_text, PROFILE, MAX_SEQ_LEN, seed, iteration, tried)
        tried.append(proposal["key"])
        candidate = apply_patch(best_text, proposal["patch"])
        value = observed(candidate, rng)
        if value < best_seen:
            best_text, best_seen = candidate, value
        regrets.append(true_value(best_text) - 1.0)
    return regrets


def apply_patch(text, patch):
    """The new train.py of a one-line unified diff from proposers.random_proposal."""
    lines = text.splitlines(keepends=True)
    removed = [line[1:] for line in patch.splitlines(keepends=True) if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in patch.splitlines(keepends=True) if line.startswith("+") and not line.startswith("+++")]
    index = lines.index(removed[0])
    return "".join(lines[:index] + added + lines[index + 1:])


def run_optuna(text, seed, experiments, sampler):
    """The Optuna proposer: one study, the baseline as its first trial, then ask/tell on the bowl."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rng = random.Random(f"noise:{seed}")
    storage = optuna.storages.InMemoryStorage()
    study, space = search.load_study(storage, "bench", sampler, seed, text, PROFILE)
    study.add_trial(optuna.trial.create_trial(
        params=study.user_attrs["x0"], distributions={search.parameter(d): search.distribution(d) for d in space},
        value=observed(text, rng)))
    best_text, best_seen, regrets = text, math.inf, []
    for iteration in range(1, experiments + 1):
        study.sampler = search.make_sampler(sampler, search.seed_for(seed, iteration), space, study.user_attrs["x0"])
        trial, values = search.ask(study, space, "bench", iteration, MAX_SEQ_LEN)
        candidate = search.rewrite(text, PROFILE, values)
        value = observed(candidate, rng)
        study.tell(trial, value)
        if value < best_seen:
            best_text, best_seen = candidate, value
        regrets.append(true_value(best_text) - 1.0)
    return regrets


def bowl_table(seeds, experiments):
    text = (ROOT / "train.py").read_text()
    runners = {"random": lambda seed: run_random(text, seed, experiments),
               "tpe": lambda seed: run_optuna(text, seed, experiments, "tpe"),
               "cmaes": lambda seed: run_optuna(text, seed, experiments, "cmaes")}
    curves, seconds = {}, {}
    for name, runner in runners.items():
        started = time.monotonic()
        curves[name] = [runner(seed) for seed in range(seeds)]
        seconds[name] = time.monotonic() - started
    marks = [n for n in CHECKPOINTS if n <= experiments] or [experiments]
    print(f"bowl: baseline regret {true_value(text) - 1.0:.5f}; mean regret over {seeds} seeds "
          f"(lower is better; 0 = the optimum)")
    print("| proposer | " + " | ".join(f"after {n}" for n in marks) + " | reaches random's final regret at | seconds |")
    print("| --- | " + " | ".join("---" for _ in marks) + " | --- | --- |")
    mean = {name: [statistics.fmean(curve[i] for curve in runs) for i in range(experiments)]
            for name, runs in curves.items()}
    target = mean["random"][-1]
    for name in runners:
        reached = next((i + 1 for i, value in enumerate(mean[name]) if value <= target), None)
        print(f"| {name} | " + " | ".join(f"{mean[name][n - 1]:.5f}" for n in marks)
              + f" | {reached or 'not within ' + str(experiments)} | {seconds[name]:.1f} |")
    reached = next((i + 1 for i, value in enumerate(mean["tpe"]) if value <= target), None)
    verdict = "met" if reached and reached <= experiments / 2 else "NOT met"
    print(f"target (TPE reaches random's final regret {target:.5f} within {experiments // 2} experiments): {verdict}")
    return mean


def real_comparison(experiments, agents=("random", "tpe", "cmaes")):
    """Each proposer in its own copy of the repository, the real cpu-profile training, N experiments."""
    results = {}
    for name in agents:
        folder = Path(tempfile.mkdtemp(prefix=f"search-{name}-"))
        try:
            subprocess.run(["git", "clone", "-q", str(ROOT), str(folder / "repo")], check=True)
            agent = ["--agent", "random"] if name == "random" else ["--agent", "optuna", "--sampler", name]
            started = time.monotonic()
            subprocess.run([sys.executable, "scripts/loop.py", "start", "--tag", f"bench-{name}", *agent,
                            "--max-experiments", str(experiments), "--noise-runs", "0"],
                           cwd=folder / "repo", check=False, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            rows = [line.split("\t") for line in (folder / "repo" / "results.tsv").read_text().splitlines()[1:]]
            kept = [float(row[1]) for row in rows if row[3] == "keep"]
            results[name] = {"baseline": kept[0] if kept else None, "best": min(kept) if kept else None,
                             "crashes": sum(row[3] == "crash" for row in rows), "rows": len(rows),
                             "minutes": round((time.monotonic() - started) / 60, 1)}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    return results


def main():
    warnings.filterwarnings("ignore", module="optuna")  # CMA-ES's "experimental" and "moving" notices
    parser = argparse.ArgumentParser(description="Random search against TPE and CMA-ES on the bowl (and "
                                     "optionally on the real cpu profile).")
    parser.add_argument("--seeds", type=int, default=20, help="independent searches per proposer (default 20)")
    parser.add_argument("--experiments", type=int, default=30, help="experiments per search (default 30)")
    parser.add_argument("--real", type=int, metavar="N", help="instead: N experiments per proposer on the real "
                        "cpu profile, each in a fresh clone of this repository (minutes per experiment)")
    args = parser.parse_args()
    if args.real:
        real_comparison(args.real)
    else:
        bowl_table(args.seeds, args.experiments)


if __name__ == "__main__":
    main()
