"""sCD: continuous-time consistency distillation, the baseline the paper improves on.

It is AYF-EMD with the end time pinned to ``s = 0`` (docs/design.md section 3): the student is a
consistency model ``f(x_t, t, 0)`` and is sampled multistep with re-noising.
"""

from __future__ import annotations

from flowmap_lit.objectives.ayf_emd import AYFEMD


class SCD(AYFEMD):
    """AYF-EMD with ``s = 0`` for every sample, whatever the time-pair sampler drew."""

    s_override = "zero"
