"""Attention inside the tangent pass: the math kernel against the chunked closed-form tangent.

    python benchmarks/attention_jvp.py                       # CPU: 256 to 4096 tokens
    python benchmarks/attention_jvp.py --tokens 1024 4096 16384 --device cuda

For each token count, ``torch.func.jvp`` of one attention call (batch ``--batch``, ``--heads``
heads of width ``--head-dim``, tangents on q, k and v) is run with each form of
``flowmap_lit.networks.attention`` (docs/design.md section 4): ``math`` (SDPA math kernel,
differentiated op by op) and ``chunked`` (fused kernel plus the closed-form tangent in query
blocks of at most ``--chunk-elements`` scores). Reports per form the median time (after one warm-up call) and the peak
memory of the call above what its inputs hold: on CUDA ``torch.cuda.max_memory_allocated``, on
the CPU the peak resident set of a fresh subprocess per measurement (so one form's freed pages do
not hide the other's), and the largest relative difference between the two tangents. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowmap_lit.networks.attention import attention, forward_ad_safe_attention  # noqa: E402


def inputs(args, tokens: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, tokens, args.head_dim)
    return [torch.randn(shape, generator=gen, device=device) for _ in range(6)]


def run_once(args, form: str, tokens: int, device: torch.device) -> tuple[float, torch.Tensor]:
    q, k, v, tq, tk, tv = inputs(args, tokens, device)
    with torch.no_grad(), forward_ad_safe_attention(form=form, chunk_elements=args.chunk_elements):
        start = time.perf_counter()
        tangent = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))[1]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, tangent


def measure(args, form: str, tokens: int, device: torch.device) -> dict:
    """Median seconds over ``--repeats`` and the peak memory above the inputs, in this process."""
    times = []
    if device.type == "cuda":
        base = sum(x.numel() * x.element_size() for x in inputs(args, tokens, device))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run_once(args, form, tokens, device)  # warm-up: torch.func's first call sets itself up
    for _ in range(args.repeats):
        seconds, tangent = run_once(args, form, tokens, device)
        times.append(seconds)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base - tangent.numel() * tangent.element_size()
    else:
        peak = None  # measured by the parent from this subprocess's resident set
    return {"ms": 1e3 * statistics.median(times), "peak_mib": None if peak is None else peak / 2**20}


def child(args) -> None:
    """Subprocess entry: one form at one token count, on the CPU; prints its JSON line."""
    device = torch.device("cpu")
    q = inputs(args, args.tokens[0], device)  # noqa: F841 (the inputs' pages, counted in the baseline)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = measure(args, args.child, args.tokens[0], device)
    out["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024
    print(json.dumps(out))


def relative_difference(args, tokens: int, device: torch.device) -> float:
    a = run_once(args, "math", tokens, device)[1]
    b = run_once(args, "chunked", tokens, device)[1]
    return float((a - b).norm() / a.norm())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk-elements", type=int, default=2**22)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    device = torch.device(args.device)
    rows = []
    for tokens in args.tokens:
        row = {"tokens": tokens}
        for form in ("math", "chunked"):
            if device.type == "cuda":
                row[form] = measure(args, form, tokens, device)
            else:
                cmd = [sys.executable, __file__, "--child", form, "--tokens", str(tokens), "--batch", str(args.batch),
                       "--heads", str(args.heads), "--head-dim", str(args.head_dim),
                       "--chunk-elements", str(args.chunk_elements), "--repeats", str(args.repeats)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=True)
                row[form] = json.loads(proc.stdout.strip().splitlines()[-1])
        row["tangent_rel_difference"] = relative_difference(args, min(tokens, 1024), device)
        row["peak_ratio_math_over_chunked"] = row["math"]["peak_mib"] / max(row["chunked"]["peak_mib"], 1e-3)
        row["time_ratio_chunked_over_math"] = row["chunked"]["ms"] / row["math"]["ms"]
        print(f"{tokens:>6} tokens: math {row['math']['ms']:8.1f} ms {row['math']['peak_mib']:8.1f} MiB   "
              f"chunked {row['chunked']['ms']:8.1f} ms {row['chunked']['peak_mib']:8.1f} MiB   "
              f"rel. diff {row['tangent_rel_difference']:.1e}", file=sys.stderr, flush=True)
        rows.append(row)
    out = {"device": str(device), "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
           "chunk_elements": args.chunk_elements, "torch": torch.__version__, "rows": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
