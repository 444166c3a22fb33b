"""Forward+backward speed of the hand-written BN (chapter 2) against PyTorch's native kernel.

Runs :func:`bnbook.backprop.benchmark` (the function chapter 2 calls at small sizes) at
larger sizes, prints a table and writes the rows plus the machine record as JSON::

    python benchmarks/bn_backward.py                       # CPU (or CUDA if available), default sizes
    python benchmarks/bn_backward.py --device cuda --repeats 100 --out bn_backward_cuda.json
    python benchmarks/bn_backward.py --shapes 4096x1024 64x256x28x28 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bnbook import backprop
from bnbook.env import environment, resolve_device
from bnbook.errors import BnbookError

DEFAULT_SHAPES = ["1024x4096", "4096x1024", "128x64x32x32", "64x256x16x16", "32x128x56x56"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_shape(text: str) -> tuple[int, ...]:
    """'32x64x8x8' -> (32, 64, 8, 8); raises a clear error for anything else."""
    try:
        shape = tuple(int(s) for s in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise BnbookError(f"bad shape {text!r}: write it as NxC or NxCxHxW, e.g. 32x64x8x8") from None
    if len(shape) < 2 or min(shape) < 1:
        raise BnbookError(f"bad shape {text!r}: need at least N and C, all positive")
    return shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="input shapes NxC or NxCxHxW")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--out", type=Path, help="write the rows and machine record to this JSON file")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        shapes = [parse_shape(s) for s in args.shapes]
        rows = backprop.benchmark(shapes, device, args.repeats, args.warmup, args.threads or None, DTYPES[args.dtype])
    except BnbookError as exc:
        print(f"bn_backward: error: {exc}", file=sys.stderr)
        return 2
    names = list(backprop.IMPLEMENTATIONS)
    print(f"{'shape':>16} {'m':>10} " + " ".join(f"{n + ' ms':>12}" for n in names)
          + " " + " ".join(f"{n + '/native':>16}" for n in names[1:]))
    for r in rows:
        print(f"{r['shape']:>16} {r['m']:>10,} " + " ".join(f"{r[n + '_ms']:>12.3f}" for n in names)
              + " " + " ".join(f"{r[n + '_ratio']:>16.2f}" for n in names[1:]))
    record = {
        "benchmark": "bn_backward",
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads or torch.get_num_threads(),
        "environment": environment(device),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
