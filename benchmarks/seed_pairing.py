"""Same-seed pairing on the cpu profile: does a seed's offset carry over from one commit to the next?

An experiment trains first under seed 42 and is judged against the best kept commit's mean over
all its seeds (the baseline's: seeds 42, 43 and 44). On the cpu profiles a run is a function of
code and seed alone (the budget is tokens), so a seed that happens to train badly shifts every
first run by the same amount. This measures how much, and whether comparing same-seed runs (a
paired delta) would be less noisy than the rule's single run against a mean.

It trains train.py as it is, and with each --change (one constant of train.py's cpu block set to
another value), under each --seed, by hand (in-process val_bpb, no helpers), in a throw-away copy
of the project and a throw-away cache of the built-in corpus. Then it prints:
- every val_bpb, and each commit's mean and standard deviation over the seeds;
- the pooled seed sd (what setup's noise runs estimate);
- for each change, its same-seed differences from the baseline and their sd, against the sd of one
  run against a mean of all the seeds (pooled sd x sqrt(1 + 1/seeds));
- the offset of the first seed: the baseline's run under it, against the baseline's mean.

Measured 2026-12-02 on the 2-core VM, cpu profile defaults (nine runs, 11 min): see the closing
note of issue 11. The baseline's seeds 42, 43, 44 gave 1.698943, 1.663977, 1.665719 (an offset of
+0.0227 for seed 42); EMBEDDING_LR 0.6 gave 1.674216, 1.660592, 1.662926 and MATRIX_LR 0.045
1.668374, 1.650544, 1.658387: same-seed differences with sd 0.0125 and 0.0120, against 0.0152 for
one run against the mean of three (pooled seed sd 0.0132).

Usage:
    uv run benchmarks/seed_pairing.py [--change NAME=VALUE ...] [--seeds 42 43 44] [--train-tokens N]
"""

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CPU_BLOCK = "if PROFILE in CPU_PROFILES:\n"
DEFAULT_CHANGES = ("EMBEDDING_LR=0.6", "MATRIX_LR=0.045")


def with_change(source, change):
    """train.py's source with one constant of its cpu block set: the block's own line replaced, or,
    when the block does not set it, a line added at the block's end (after the block, the cpu
    profile's values are final)."""
    name, value = change.split("=", 1)
    start = source.index(CPU_BLOCK) + len(CPU_BLOCK)
    end = source.index("\n\n", start) + 1
    block = source[start:end]
    line = f"    {name} = {value}\n"
    pattern = re.compile(rf"^    {re.escape(name)} = .*\n", re.MULTILINE)
    block = pattern.sub(line, block) if pattern.search(block) else block + line
    return source[:start] + block + source[end:]


def train(folder, script, seed, env):
    """val_bpb and steps of one run by hand."""
    result = subprocess.run([sys.executable, script], cwd=folder, env=dict(env, AUTORESEARCH_SEED=str(seed)),
                            capture_output=True, text=True, timeout=3600)
    found = {key: re.search(rf"^{key}:\s+(\S+)$", result.stdout, re.MULTILINE) for key in ("val_bpb", "num_steps")}
    if result.returncode != 0 or not all(found.values()):
        sys.exit(f"{script} under seed {seed} failed (exit {result.returncode}): {result.stderr.strip()[-1000:]}")
    return float(found["val_bpb"].group(1)), int(found["num_steps"].group(1))


def main():
    parser = argparse.ArgumentParser(description="Same-seed pairing on the cpu profile.")
    parser.add_argument("--change", action="append", metavar="NAME=VALUE",
                        help=f"a constant of train.py's cpu block to change; repeat for more commits "
                             f"(default: {' and '.join(DEFAULT_CHANGES)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="seeds (default 42 43 44)")
    parser.add_argument("--train-tokens", type=int, help="prepare with this budget (default: the cpu profile's)")
    args = parser.parse_args()
    changes = args.change or list(DEFAULT_CHANGES)
    for change in changes:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*=\S.*", change):
            parser.error(f"--change {change!r}: expected NAME=VALUE, for example EMBEDDING_LR=0.6")
    if len(args.seeds) < 2:
        parser.error("--seeds: at least two, to measure a spread")
    with tempfile.TemporaryDirectory(prefix="seed-pairing-") as temporary:
        folder, cache = Path(temporary) / "project", Path(temporary) / "cache"
        folder.mkdir()
        shutil.copy(PROJECT / "prepare.py", folder)
        source = (PROJECT / "train.py").read_text()
        scripts = {"baseline": "train.py"}
        (folder / "train.py").write_text(source)
        for number, change in enumerate(changes):
            scripts[change] = f"train_{number}.py"
            (folder / scripts[change]).write_text(with_change(source, change))
        env = {key: value for key, value in os.environ.items() if not key.startswith("AUTORESEARCH_")}
        env["AUTORESEARCH_CACHE"] = str(cache)
        prepare = [sys.executable, "prepare.py", "--dataset", "builtin", "--profile", "cpu"]
        prepare += ["--train-tokens", str(args.train_tokens)] if args.train_tokens else []
        subprocess.run(prepare, cwd=folder, env=env, check=True, capture_output=True)
        started = time.monotonic()
        results = {}
        for label, script in scripts.items():
            results[label] = {}
            for seed in args.seeds:
                value, steps = train(folder, script, seed, env)
                results[label][seed] = value
                print(f"{label} seed {seed}: val_bpb {value:.6f} ({steps} steps)", flush=True)
    seconds = time.monotonic() - started
    for label, values in results.items():
        print(f"{label}: mean {statistics.fmean(values.values()):.6f}, sd {statistics.stdev(values.values()):.6f}")
    pooled = math.sqrt(statistics.fmean(statistics.variance(values.values()) for values in results.values()))
    unpaired = pooled * math.sqrt(1 + 1 / len(args.seeds))
    print(f"pooled seed sd {pooled:.6f}; one run against a mean of {len(args.seeds)}: sd {unpaired:.6f}")
    base = results["baseline"]
    for change in changes:
        differences = [results[change][seed] - base[seed] for seed in args.seeds]
        print(f"{change}: same-seed differences {', '.join(f'{d:+.6f}' for d in differences)}, "
              f"mean {statistics.fmean(differences):+.6f}, sd {statistics.stdev(differences):.6f} "
              f"(paired/unpaired {statistics.stdev(differences) / unpaired:.2f})")
    first = args.seeds[0]
    print(f"seed {first} offset: the baseline's run {base[first]:.6f} against its mean "
          f"{statistics.fmean(base.values()):.6f}: {base[first] - statistics.fmean(base.values()):+.6f} "
          f"({(base[first] - statistics.fmean(base.values())) / pooled:+.2f} pooled sd); "
          f"{len(results) * len(args.seeds)} runs in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
