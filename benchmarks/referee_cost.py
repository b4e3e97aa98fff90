"""What the referee costs: the export in train.py, the re-evaluation in a fresh process, and the
causality probe, each against the time of one experiment on the CPU profile.

Runs the real train.py once with AUTORESEARCH_EXPORT set (the export time is what train.py prints),
then `prepare.py score` on the saved model (wall time of the fresh process: start-up, torch import,
loading the program, scoring val, the probe), then times the causality probe alone against the
evaluation it belongs to. The export and the re-evaluation are paid only for keep candidates; the
probe runs in every evaluation. Target: together under 10% of an experiment.

Uses $AUTORESEARCH_CACHE when it holds data prepared for the profile, else prepares the built-in
corpus for it in a temporary folder first (not timed).

Usage:
    uv run benchmarks/referee_cost.py [--profile cpu|gpu|h100] [--time-budget SECONDS]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys, time, numpy as np, torch
sys.path.insert(0, sys.argv[2])
import prepare
module = torch.export.load(sys.argv[1]).module()
rows = np.load(prepare.require_prepared_dir() / "val_rows.npy", mmap_mode="r")
batch = int(sys.argv[3])
started = time.perf_counter()
with torch.no_grad():
    prepare.score_rows(module, rows, batch, prepare.get_token_bytes("cpu"))
scored = time.perf_counter()
prepare.check_causality(module, rows, batch)
print(json.dumps({"score_s": scored - started, "probe_s": time.perf_counter() - scored, "rows": len(rows)}))
"""


def timed(command, env):
    started = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - started, result.stdout


def prepared_cache(profile, time_budget, folder):
    """A cache with data for `profile`: $AUTORESEARCH_CACHE if it has it, else the built-in corpus in `folder`."""
    cache = Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")
    manifest = cache / "prepared" / "prepared.json"
    if manifest.exists() and json.loads(manifest.read_text())["profile"] == profile and time_budget is None:
        return cache
    args = ["--dataset", "builtin", "--profile", profile] + (["--time-budget", str(time_budget)] if time_budget else [])
    print(f"preparing the built-in corpus for the {profile} profile in {folder} (not timed)", flush=True)
    subprocess.run([sys.executable, str(PROJECT / "prepare.py"), *args], env=dict(os.environ, AUTORESEARCH_CACHE=str(folder)),
                   check=True, capture_output=True)
    return Path(folder)


def main():
    parser = argparse.ArgumentParser(description="Cost of the export, the re-evaluation and the causality probe.")
    parser.add_argument("--profile", default="cpu", choices=["cpu", "gpu", "h100"], help="protocol profile (default cpu)")
    parser.add_argument("--time-budget", type=int, help="override the profile's training seconds (a shorter run "
                        "makes the referee look relatively dearer)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        cache = prepared_cache(args.profile, args.time_budget, Path(temporary) / "cache")
        manifest = json.loads((cache / "prepared" / "prepared.json").read_text())
        model = Path(temporary) / "model.pt2"
        env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_EXPORT=str(model), PYTHONUNBUFFERED="1")
        env.pop("AUTORESEARCH_PROFILE", None)
        experiment_s, log = timed([sys.executable, "train.py"], env)
        export_s = float(re.search(r"saved the model for the referee to .* in ([\d.]+)s", log).group(1))
        val_bpb = float(re.search(r"^val_bpb:\s*(\S+)", log, re.MULTILINE).group(1))
        device = re.search(r"^device:\s*(.*)$", log, re.MULTILINE).group(1)
        training_s, total_s = (float(re.search(rf"^{key}:\s*(\S+)", log, re.MULTILINE).group(1))
                               for key in ("training_seconds", "total_seconds"))
        rescore_s, scored = timed([sys.executable, "prepare.py", "score", str(model)], env)
        referee_bpb = float(re.search(r"^val_bpb:\s*(\S+)", scored, re.MULTILINE).group(1))
        batch = re.search(r"^batch: .* = \d+ x (\d+) x \d+", log, re.MULTILINE).group(1)  # train.py's DEVICE_BATCH_SIZE
        _, probe = timed([sys.executable, "-c", PROBE, str(model), str(PROJECT), batch], env)
        probe = json.loads(probe)
        size_mb = model.stat().st_size / 1e6

    def share(seconds):
        return f"{seconds:.1f} s = {100 * seconds / experiment_s:.1f}% of the experiment"

    print(f"experiment: train.py on the {manifest['profile']} profile ({manifest['time_budget']} s budget, "
          f"{manifest['eval_tokens']:,} eval tokens, {device}): {experiment_s:.1f} s wall, of which "
          f"{total_s - training_s - export_s:.1f} s its own set-up and evaluation")
    print(f"export (torch.export + save, {size_mb:.0f} MB model.pt2): {share(export_s)}")
    print(f"re-evaluation (prepare.py score, fresh process): {share(rescore_s)}; "
          f"val_bpb {referee_bpb:.6f} vs train.py's {val_bpb:.6f} ({referee_bpb - val_bpb:+.1e})")
    print(f"causality probe (prepare.CAUSALITY_PROBE_ROWS rows, two forward passes): {probe['probe_s']:.2f} s, against "
          f"{probe['score_s']:.1f} s to score {probe['rows']} val rows ({100 * probe['probe_s'] / experiment_s:.2f}% "
          "of the experiment, in every evaluation)")
    total = export_s + rescore_s + probe["probe_s"]
    print(f"together: {share(total)} (target < 10%) for a keep candidate; every other experiment pays only the "
          f"export and its own probe: {share(export_s + probe['probe_s'])}")
    # The re-evaluation costs about one evaluation; it stays within the target on average when keep
    # candidates are few enough.
    budget = 0.10 * experiment_s - export_s - probe["probe_s"]
    print(f"on average under 10% while at most {max(budget, 0) / rescore_s:.0%} of experiments are keep candidates")


if __name__ == "__main__":
    main()
