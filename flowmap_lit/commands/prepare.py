"""Create a dataset of latents in the package's shard format (``flowmap_lit.data``).

    python -m flowmap_lit prepare SOURCE ... --out DIR

Sources (``flowmap_lit.data.prepare.SUBCOMMANDS``): digits, shapes, images, array, text-array,
text-prompts (prompts only, no latents), imagenet; ``python -m flowmap_lit prepare SOURCE --help``
lists each one's arguments.
"""

from __future__ import annotations

import argparse
import sys

from flowmap_lit.data.format import PREPARE_CMD
from flowmap_lit.data.prepare import SUBCOMMANDS
from flowmap_lit.data.prepare import __doc__ as PREPARE_DOC


def main(argv: list[str] | None = None) -> dict | None:
    """Parse ``argv`` (default: sys.argv), prepare the dataset, print a summary, return its stats."""
    parser = argparse.ArgumentParser(prog=PREPARE_CMD, description=PREPARE_DOC.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    stats = args.func(args)
    if stats is None:  # a parallel writer whose peers are still running
        return None
    splits = ", ".join(f"{k}: {v['num_samples']} samples in {v['num_shards']} shards"
                       for k, v in stats["splits"].items())
    what = (f"prompts only, text {stats['text']['emb_shape']}" if stats["shape"] is None
            else f"{stats['kind']} {stats['shape']}, {stats['num_classes']} classes")
    print(f"wrote {args.out}: {what}; {splits}")
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
