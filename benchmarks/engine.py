"""Training throughput of the engine against a tutorial loop (chapter 3's BN MLP, batch 60).

Runs :func:`bnbook.bench.run_benchmark` (what the performance appendix runs under the book's
profiles), prints a table and writes the summary plus the machine record as JSON::

    python benchmarks/engine.py                                  # CPU (or CUDA if available), 1 thread
    python benchmarks/engine.py --steps 1000 --repeats 5 --stacks 1 8 16 32 --out engine.json
    python benchmarks/engine.py --device cuda --stacks 1 64 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bnbook import bench
from bnbook.env import environment, resolve_device
from bnbook.errors import BnbookError
from bnbook.results import to_jsonable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before each measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--stacks", type=int, nargs="+", default=[1, 8, 16], help="models trained at once")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        settings = bench.BenchSettings(dataset=args.dataset, steps=args.steps, warmup=args.warmup,
                                       stacks=tuple(args.stacks), repeats=args.repeats, threads=args.threads or None)
        summary = bench.run_benchmark(settings, device, progress=lambda msg: print(msg, file=sys.stderr))
    except BnbookError as exc:
        print(f"engine benchmark: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'contender':<12} {'models':>6} {'best':>9} {'median':>9} {'x tutorial':>10} {'% limit':>8}")
    for r in summary["rows"]:
        print(f"{r['contender']:<12} {r['models']:>6} {r['best']:>9.0f} {r['median']:>9.0f} "
              f"{r['ratio']:>10.2f} {100 * r['fraction_of_limit']:>8.0f}")
    print(f"compute limit {summary['compute_limit_model_steps_per_s']:.0f} model-steps/s "
          f"({summary['flops_per_model_step'] / 1e6:.1f} MFLOP/step, sgemm "
          f"{summary['sgemm_gflops_used_threads']:.0f} GFLOP/s on {summary['threads']} thread(s), "
          f"{summary['sgemm_gflops_all_threads']:.0f} on {summary['threads_all']})")
    if args.out:
        args.out.write_text(json.dumps(to_jsonable({**summary, "environment": environment(device)}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
