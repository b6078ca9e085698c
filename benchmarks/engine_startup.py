"""Ready to serve: time from "load the build" to the first token, with the build's AOT engines and with today's
compile-at-load (torch.compile of the same decode and speculative steps).

    nemo3-build --precision bf16 --engines --output /tmp/deploy   # the engines stage compiles OUT/engines/
    python benchmarks/engine_startup.py /tmp/deploy [--mtp 2] [--repeats 2] [--executor aot --executor compiled]

Each case runs `--repeats` times in a fresh child process with a fresh, empty inductor cache (what a server
start-up meets): open_scheduler on the build (weights loaded, engines loaded or steps compiled, both for the
engines' max_sequences and max_length), then one greedy request of 8 tokens; the time until its first token is
reported, median over the repeats. The child runs with one torch thread, as `nemo3 bench` does by default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from nemo3.engines.benchmark import engine_shape

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
start = time.perf_counter()
from nemo3.engines.runtime.factory import StackOptions, open_scheduler
from nemo3.engines.runtime.requests import GenerationParams
build, executor, k, rows, length = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
scheduler = open_scheduler(build, StackOptions(engines=executor == "aot", compile=executor == "compiled",
                                               num_speculative_tokens=k, max_sequences=rows, max_length=length))
ready = time.perf_counter()
for delta in scheduler.stream("The history of", GenerationParams(max_tokens=8, ignore_eos=True)):
    first = time.perf_counter()
    break
print(json.dumps({"executor": scheduler.executor.kind, "load_s": ready - start, "first_token_s": first - start}))
"""


def run_child(build: str, executor: str, k: int, shape: tuple[int, int]) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", CHILD, build, executor, str(k), *map(str, shape)], env=env,
                             check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build")
    parser.add_argument("--mtp", type=int, default=2, help="MTP draft tokens served (the engines' --engine-mtp)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--executor", action="append", choices=("aot", "compiled"), default=None)
    args = parser.parse_args()
    shape = engine_shape(args.build)
    if shape is None:
        raise SystemExit(f"{args.build}: no engines (build them with nemo3-build)")
    rows = {}
    for _ in range(args.repeats):
        for executor in args.executor or ("aot", "compiled"):
            result = run_child(args.build, executor, args.mtp, shape)
            rows.setdefault(executor, []).append(result)
    print("| executor | load the build (s) | to the first token (s) |\n|---|---|---|")
    for executor, results in rows.items():
        load = statistics.median(r["load_s"] for r in results)
        first = statistics.median(r["first_token_s"] for r in results)
        print(f"| {results[0]['executor']} | {load:.2f} | {first:.2f} |")
    if len(rows) == 2:
        ratio = statistics.median(r["first_token_s"] for r in rows["compiled"]) / statistics.median(
            r["first_token_s"] for r in rows["aot"])
        print(f"\nengines are ready to serve {ratio:.1f}x sooner than compile-at-load")


if __name__ == "__main__":
    main()
