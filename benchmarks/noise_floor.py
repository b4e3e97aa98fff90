"""The cpu profile's noise floor as setup measures it, on a quiet machine and under load (issue 11).

Copies this project into a throw-away git repository, prepares the built-in corpus for the cpu
profile in a throw-away cache, and runs setup's noise measurement through the real helpers:
setup.py with its two noise runs, then the baseline experiment, so three seeds of the real
train.py, each in the sandbox and scored by the referee. Then the same again (a new session) with
--busy processes spinning on the CPU. Prints each run's val_bpb, steps and compute, both spreads
(the pooled standard deviation setup records as noise_bpb) and their ratio.

The cpu profile's budget is training tokens (prepare.py's train_tokens), so the same seed trains
the same steps with the same schedule on a loaded machine, only slower by the wall clock; the
helper measures the CPU time and stops a run past 1.5x the baseline's. Target: the loaded spread
within 1.5x of the quiet one, and below 0.02 val_bpb. Six runs of the profile's 2^19 tokens
(about 65 s of CPU each, 40 s of wall on two idle cores, three times that under the load) plus
export and the referee. It also prints how close the loaded runs came to the
quiet session's compute ceiling.

Measured before the token budget (2026-12-01, 90 CPU-s budget): quiet 0.0127, loaded 0.0197,
ratio 1.55, and on the idle machine an hour later quiet 0.088 (39 to 63 steps for the same
CPU-seconds). On the token budget (2026-12-02, 2^19 tokens, 13 min in all): quiet 0.019704 (seeds
43, 44, 42: 1.663977, 1.665719, 1.698943; 64 steps each, 85 to 87 CPU-s), with 2 busy processes the
same three numbers, bit for bit (89 to 94 CPU-s, three times the wall time), ratio 1.00. What is
left is the seeds' own spread. Again on 2026-12-07 (9 min in all): the same six numbers, 62 to 65
CPU-s a run quiet (36 to 38 s of wall) and 63 to 64 loaded (109 to 111 s), since prepare.py keeps
the memory a step frees for the next (keep_freed_memory_for_reuse).

Usage:
    uv run benchmarks/noise_floor.py [--train-tokens N] [--eval-tokens N] [--busy N]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))
from repos import commit_new_repository  # noqa: E402  (one recipe with the tests)
BUSY_LOOP = "while True: pass"


def copy_project(root):
    repo = root / "repo"
    repo.mkdir()
    for name in ("prepare.py", "train.py", ".gitignore"):
        shutil.copy(PROJECT / name, repo)
    for folder in ("scripts", "skills"):
        shutil.copytree(PROJECT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    commit_new_repository(repo)
    return repo


def helper(repo, env, *args, timeout=3600):
    result = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}")
    return result.stdout.strip()


def measure(repo, env, tag):
    """setup.py's noise runs and the baseline: (noise_bpb, [per-run dicts], wall seconds)."""
    started = time.monotonic()
    helper(repo, env, "scripts/setup.py", "--tag", tag, "--noise-runs", "2", "--new-session")
    helper(repo, env, "scripts/experiment.py", "baseline")
    helper(repo, env, "scripts/decide.py", "keep")
    seconds = time.monotonic() - started
    session = json.loads((repo / "runs" / "session.json").read_text())
    runs = []  # (the ceiling: runner.TOKEN_CEILING x the most compute of these runs)
    for sample in session["noise_runs"]:
        summary = json.loads(next((repo / "runs").glob(f"{sample['run']}/summary.json")).read_text())
        runs.append({"seed": sample["seed"], "val_bpb": sample["val_bpb"], "steps": summary["metrics"].get("num_steps"),
                     "cpu_s": summary.get("compute_seconds"), "wall_s": summary.get("wall_seconds"),
                     "sandbox": summary.get("sandbox")})
    return session["noise_bpb"], runs, seconds


def report(label, noise, runs, seconds):
    values = ", ".join(f"seed {run['seed']}: {run['val_bpb']:.6f} ({run['steps']} steps, {run['cpu_s']:.0f} s cpu, "
                       f"{run['wall_s']:.0f} s wall)" for run in runs)
    print(f"{label}: noise {noise:.6f} val_bpb over {len(runs)} seeds [{values}], {seconds / 60:.1f} min, "
          f"sandbox {runs[0]['sandbox']}", flush=True)


def main():
    parser = argparse.ArgumentParser(description="The cpu profile's noise floor, quiet and under load.")
    parser.add_argument("--train-tokens", type=int, help="prepare with this training budget in tokens "
                        "(default: the cpu profile's)")
    parser.add_argument("--eval-tokens", type=int, help="prepare with this many evaluation tokens (default: "
                        "the cpu profile's)")
    parser.add_argument("--busy", type=int, default=2, help="busy processes for the loaded measurement (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="noise-floor-") as temporary:
        root = Path(temporary)
        repo, cache = copy_project(root), root / "cache"
        env = dict(os.environ, AUTORESEARCH_CACHE=str(cache))
        for key in ("AUTORESEARCH_TRAIN_COMMAND", "AUTORESEARCH_SEED", "AUTORESEARCH_PROFILE", "AUTORESEARCH_DATASET"):
            env.pop(key, None)
        prepare = ["prepare.py", "--dataset", "builtin", "--profile", "cpu"]
        prepare += ["--train-tokens", str(args.train_tokens)] if args.train_tokens else []
        prepare += ["--eval-tokens", str(args.eval_tokens)] if args.eval_tokens else []
        started = time.monotonic()
        helper(repo, env, *prepare)
        manifest = json.loads((cache / "prepared" / "prepared.json").read_text())
        print(f"prepared the builtin corpus for the cpu profile in {time.monotonic() - started:.0f} s: budget "
              f"{manifest['train_tokens']:,} tokens, {manifest['eval_tokens']} eval tokens", flush=True)

        quiet = measure(repo, env, "quiet")
        report("quiet", *quiet)
        busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], start_new_session=True) for _ in range(args.busy)]
        try:
            loaded = measure(repo, env, "loaded")
        finally:
            for process in busy:
                process.kill()
                process.wait()
        report(f"with {args.busy} busy processes", *loaded)
        ratio = loaded[0] / quiet[0] if quiet[0] else float("inf")
        target = "met" if ratio <= 1.5 and loaded[0] < 0.02 else "NOT met"
        print(f"spread under load / quiet spread = {ratio:.2f} (target <= 1.5 and loaded < 0.02: {target})")
        quiet_most = max(run["cpu_s"] for run in quiet[1])
        loaded_most = max(run["cpu_s"] for run in loaded[1])
        print(f"compute: the loaded runs used up to {loaded_most / quiet_most:.2f}x the most of the quiet ones "
              f"({loaded_most:.1f} against {quiet_most:.1f} CPU-s; a session stops a run past 1.5x its baseline's)")


if __name__ == "__main__":
    main()
