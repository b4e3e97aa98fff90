"""
Dataloader throughput: training tokens per second that prepare.make_dataloader delivers
from one process, at the H100 profile's shape (128 x 2048) unless told otherwise.

An H100 consumes about 1.65 M tokens/s at the baseline; the target is 3x that (5 M tokens/s),
so the loader is never what the GPU waits for.

Usage:
    uv run benchmarks/dataloader.py                    # prepares the builtin corpus in a temporary cache
    AUTORESEARCH_CACHE=~/.cache/autoresearch uv run benchmarks/dataloader.py --use-cache
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_TOKENS_PER_SECOND = 5e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--use-cache", action="store_true", help="use the prepared data in $AUTORESEARCH_CACHE as it is")
    parser.add_argument("--batch-size", type=int, default=128, help="rows per batch (default 128)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to measure (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if not args.use_cache:
            os.environ["AUTORESEARCH_CACHE"] = scratch
            subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--dataset", "builtin", "--profile", "h100",
                            "--eval-tokens", str(64 * 2048)], check=True, stderr=subprocess.DEVNULL)
        sys.path.insert(0, str(ROOT))
        import prepare
        loader = prepare.make_dataloader(args.batch_size, "cpu", seed=0)
        next(loader)  # opening the cache is not what we measure
        batches, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            inputs, _, _ = next(loader)
            batches += 1
        elapsed = time.perf_counter() - start
        tokens_per_second = batches * inputs.numel() / elapsed
        print(f"dataloader: {tokens_per_second / 1e6:.2f} M tokens/s ({batches} batches of {tuple(inputs.shape)} "
              f"in {elapsed:.1f}s, one process); target {TARGET_TOKENS_PER_SECOND / 1e6:.0f} M tokens/s: "
              f"{'met' if tokens_per_second >= TARGET_TOKENS_PER_SECOND else 'NOT met'}")


if __name__ == "__main__":
    main()
