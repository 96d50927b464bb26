"""One ordinary checkpoint file from a sharded (FSDP2) checkpoint directory.

    python -m flowmap_lit consolidate checkpoints/run/last.ckpt checkpoints/run/last-full.ckpt

What is kept and how it is read: ``flowmap_lit.checkpoints.sharded``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowmap_lit.checkpoints.sharded import consolidate


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m flowmap_lit consolidate", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", help="sharded checkpoint directory written under ModelParallelStrategy (FSDP2)")
    p.add_argument("out", help="checkpoint file to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="read with weights_only=False (trusted files only)")
    args = p.parse_args(argv)
    try:
        checkpoint = consolidate(args.ckpt_dir, args.out, args.overwrite, args.allow_pickle)
    except (OSError, ValueError, RuntimeError) as err:
        raise SystemExit(f"error: {err}") from None
    ema = "EMA" in checkpoint.get("callbacks", {})
    print(f"{args.out}: step {checkpoint.get('global_step')}, {len(checkpoint['state_dict'])} state_dict tensors, "
          f"{len(checkpoint['optimizer_states'])} optimizer state(s), EMA weights: {'yes' if ema else 'no'}")
    return Path(args.out)


if __name__ == "__main__":
    main()
