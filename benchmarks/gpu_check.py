"""The GPU path measured in one command: speed, MFU both ways, overhead, and the referee's agreement.

Prepares the built-in corpus (the Python standard library: no network needed) under the h100
profile, with the evaluation tokens cut to what the corpus holds, then runs the real train.py
twice with a short budget, first with cold compile caches and then warm, each saving its model,
and the referee (`python -I` on a lone copy of prepare.py) on each saved model. Prints, per run,
tokens/s, MFU by our formula (causal average) and upstream's (full window), peak memory, the
overhead broken down (process start, start-up and compilation, evaluation, export, referee) and
the referee's val_bpb against train.py's, and writes every figure to one JSON file.

Runs on whatever torch (>= 2.9) the machine has, with the Python running it; fits in 8 minutes on
one H100 or H200. --dry-run does the same on the CPU with the cpu profile and a 5 s budget, so CI
keeps the script working.

Usage:
    python benchmarks/gpu_check.py [--time-budget 60] [--json gpu_check.json]
    uv run benchmarks/gpu_check.py --dry-run
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
# The referee's number decides; beyond this the two disagree (scripts/runner.py holds the helpers' copy).
REFEREE_TOLERANCE_BPB = 5e-4
UPSTREAM = {"tokens_per_sec": 1.65e6, "mfu_percent": 39.8, "overhead_seconds": 26.0}  # karpathy/autoresearch, H100


def run(command, env, cwd=PROJECT, timeout=900):
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.perf_counter() - started


DRY_RUN_TRAIN_TOKENS = 2 * 2**13


def prepare_corpus(cache, profile, time_budget, eval_tokens, env):
    """Prepares the built-in corpus; when its val split is too small for eval_tokens, again with what it holds."""
    seq = {"h100": 2048, "gpu": 1024, "cpu": 256}[profile]
    # the cpu profile's budget is tokens: the dry run's few seconds are two steps of its batch
    tokens = ["--train-tokens", str(DRY_RUN_TRAIN_TOKENS)] if profile == "cpu" else []
    for _ in range(2):
        result, seconds = run([sys.executable, str(PROJECT / "prepare.py"), "--dataset", "builtin", "--profile", profile,
                               "--time-budget", str(time_budget), *tokens, "--eval-tokens", str(eval_tokens)],
                              dict(env, AUTORESEARCH_CACHE=str(cache)))
        if result.returncode == 0:
            return eval_tokens, seconds
        held = re.search(r"holds only (\d+) rows", result.stderr)
        if not held or int(held.group(1)) == 0:
            sys.exit(f"prepare.py failed:\n{result.stderr[-2000:]}")
        eval_tokens = int(held.group(1)) * seq
    sys.exit(f"prepare.py failed twice:\n{result.stderr[-2000:]}")


def summary(log):
    block = log.split("\n---\n")[-1]
    values = {}
    for line in block.splitlines():
        match = re.match(r"^(\w+):\s+(.*)$", line)
        if match:
            try:
                values[match.group(1)] = float(match.group(2))
            except ValueError:
                values[match.group(1)] = match.group(2).strip()
    return values


def experiment(label, cache, workdir, env):
    """train.py by hand (its own val_bpb) saving its model, then the referee on that model."""
    out = workdir / label
    out.mkdir()
    model = out / "model.pt2"
    result, wall = run([sys.executable, "train.py"], dict(env, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_EXPORT=str(model)))
    (out / "run.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"{label}: train.py failed (exit {result.returncode}); see the tail:\n{(result.stdout + result.stderr)[-3000:]}")
    values = summary(result.stdout)
    lone = out / "referee"
    lone.mkdir()
    shutil.copy(PROJECT / "prepare.py", lone)
    scored, referee_wall = run([sys.executable, "-I", str(lone / "prepare.py"), "score", str(model)],
                               dict(env, AUTORESEARCH_CACHE=str(cache)), cwd=lone)
    (out / "referee.log").write_text(scored.stdout + scored.stderr)
    if scored.returncode != 0:
        sys.exit(f"{label}: the referee failed (exit {scored.returncode}): {scored.stderr.strip()[-2000:]}")
    referee_bpb = float(re.search(r"^val_bpb: (\S+)$", scored.stdout, re.MULTILINE).group(1))
    training = values["training_wall_seconds"]
    overhead = {
        "process_start": wall - values["total_seconds"],  # Python, torch and train.py's imports
        "startup_and_compile": values["total_seconds"] - training - values["eval_seconds"] - values["export_seconds"],
        "evaluation": values["eval_seconds"],
        "export": values["export_seconds"],
        "referee": referee_wall,
    }
    return {
        "wall_seconds": wall, "training_seconds": values["training_seconds"], "training_wall_seconds": training,
        "num_steps": values["num_steps"], "tokens_per_sec": values["tokens_per_sec"],
        "mfu_percent": values["mfu_percent"], "mfu_upstream_percent": values["mfu_upstream_percent"],
        "mfu_basis": values["mfu_basis"], "peak_vram_mb": values["peak_vram_mb"],
        "overhead_seconds": overhead,
        # under the helpers train.py does not evaluate: the referee's scoring replaces it
        "overhead_total_under_helpers": sum(overhead.values()) - overhead["evaluation"],
        "val_bpb_train": values["val_bpb"], "val_bpb_referee": referee_bpb,
        "referee_difference": referee_bpb - values["val_bpb"],
        "within_tolerance": abs(referee_bpb - values["val_bpb"]) <= REFEREE_TOLERANCE_BPB,
    }


def report(label, figures):
    o = figures["overhead_seconds"]
    print(f"{label}: {figures['tokens_per_sec']:,.0f} tok/s, MFU {figures['mfu_percent']:.1f}% (upstream's formula "
          f"{figures['mfu_upstream_percent']:.1f}%; {figures['mfu_basis']}), peak {figures['peak_vram_mb'] / 1024:.1f} GiB, "
          f"{figures['num_steps']:.0f} steps")
    print(f"  overhead {figures['overhead_total_under_helpers']:.1f} s under the helpers: process start {o['process_start']:.1f}, "
          f"start-up and compile {o['startup_and_compile']:.1f}, export {o['export']:.1f}, referee {o['referee']:.1f} "
          f"(train.py's own evaluation, skipped under the helpers: {o['evaluation']:.1f})")
    print(f"  val_bpb train.py {figures['val_bpb_train']:.6f}, referee {figures['val_bpb_referee']:.6f} "
          f"({figures['referee_difference']:+.1e}, {'within' if figures['within_tolerance'] else 'OUTSIDE'} "
          f"the {REFEREE_TOLERANCE_BPB:g} tolerance)")


def main():
    parser = argparse.ArgumentParser(description="Measure the GPU path: speed, MFU, overhead, referee agreement.")
    parser.add_argument("--dry-run", action="store_true", help="the same on the CPU: cpu profile, 5 s budget, tiny eval")
    parser.add_argument("--time-budget", type=int, help="training seconds per experiment (default 60; dry run 5)")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the figures (default gpu_check.json)")
    parser.add_argument("--keep", help="keep the prepared cache and logs in this folder instead of a temporary one")
    args = parser.parse_args()
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}); "
                 "use --dry-run on a CPU")
    profile = "cpu" if args.dry_run else "h100"
    time_budget = args.time_budget or (5 if args.dry_run else 60)
    eval_tokens = 16 * 256 if args.dry_run else 40 * 2**19
    env = {key: value for key, value in os.environ.items() if not key.startswith("AUTORESEARCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        cache = workdir / "cache"
        eval_tokens, prepare_seconds = prepare_corpus(cache, profile, time_budget, eval_tokens, env)
        print(f"prepared the built-in corpus for the {profile} profile in {prepare_seconds:.0f} s "
              f"({eval_tokens:,} eval tokens, {time_budget} s budget)", flush=True)
        # the first run compiles into the empty cache/compile; the second finds its kernels there
        runs = {label: experiment(label, cache, workdir, env) for label in ("cold", "warm")}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else platform.processor() or "cpu"
    figures = {"dry_run": args.dry_run, "profile": profile, "device": device, "torch": torch.__version__,
               "cuda": torch.version.cuda, "time_budget": time_budget, "eval_tokens": eval_tokens,
               "referee_tolerance_bpb": REFEREE_TOLERANCE_BPB, "upstream": UPSTREAM, "runs": runs}
    for label, values in runs.items():
        report(label, values)
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {args.json}")
    if not all(values["within_tolerance"] for values in runs.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
