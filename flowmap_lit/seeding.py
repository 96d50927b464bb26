"""Seeds derived from tuples of integers, shared by the data streams and the training steps."""

import numpy as np


def derive_seed(*ints: int) -> int:
    """A 63-bit seed from a tuple of ints (numpy SeedSequence hashing; negatives wrap modulo 2**64)."""
    return int(np.random.SeedSequence([int(i) % 2**64 for i in ints]).generate_state(1, np.uint64)[0] >> 1)
