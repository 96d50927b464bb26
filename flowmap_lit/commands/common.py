"""What the commands share: argument types with the project's own range messages, and the check of a
guidance scale against the range a student was trained on."""

from __future__ import annotations

import argparse
import sys


def at_least(minimum: int, what: str = "a whole number"):
    """An argparse ``type`` for whole numbers ``>= minimum`` (argparse reports the message as an error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}: give {what} of at least {minimum}")
        return value

    return parse


steps_type = at_least(1, "a step count")  # k-step sampling takes k >= 1 network calls
count_type = at_least(1, "a sample count")


def guidance_warning(module, guidance: float | None) -> str | None:
    """A warning when ``guidance`` lies outside the scales a guidance-conditioned student was trained on
    (``guidance_min``..``guidance_max``): there it extrapolates. None when inside, or not applicable."""
    if guidance is None or not getattr(module, "condition_on_guidance", False):
        return None
    low, high = float(module.guidance_min), float(module.guidance_max)
    if low <= guidance <= high:
        return None
    return (f"warning: --guidance {guidance:g} is outside [{low:g}, {high:g}], the guidance scales this student was "
            "trained on; its samples there are an extrapolation. Use a scale in that range, or distill with a "
            "wider guidance_min/guidance_max.")


def warn_guidance(module, guidance: float | None) -> None:
    message = guidance_warning(module, guidance)
    if message:
        print(message, file=sys.stderr)
