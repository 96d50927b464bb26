"""Train the small digits classifier whose features give the digits FID (``flowmap_lit.metrics.digits_classifier``).

    python -m flowmap_lit classifier --data data/digits [--out data/digits/classifier.pt]
"""

from __future__ import annotations

import argparse
import os

from flowmap_lit.metrics.digits_classifier import train_digits_classifier


def main(argv: list[str] | None = None) -> dict:
    """CLI: train, save, print the held-out accuracy."""
    parser = argparse.ArgumentParser(prog="python -m flowmap_lit classifier",
                                     description="Train the digits classifier used for digits FID features.")
    parser.add_argument("--data", default="data/digits",
                        help="dataset directory (python -m flowmap_lit prepare digits --out DIR)")
    parser.add_argument("--out", default=None, help="output file (default: DATA/classifier.pt)")
    parser.add_argument("--epochs", type=int, default=40, help="passes over the train split")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.data, "classifier.pt")
    result = train_digits_classifier(args.data, out, epochs=args.epochs, seed=args.seed)
    print(f"held-out (val) accuracy {100 * result['accuracy']:.2f}%  "
          f"train accuracy {100 * result['train_accuracy']:.2f}%  {result['seconds']:.1f} s  -> {out}")
    return result


if __name__ == "__main__":
    main()
