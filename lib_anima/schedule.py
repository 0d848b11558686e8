"""The WebUI's learning-rate schedule syntax, for hosts that no longer ship its parser (Forge).

``"0.005:100, 1e-3:1000, 1e-5"``: 0.005 until step 100, then 1e-3 until step 1000, then 1e-5 to the end. It reads
exactly as A1111's textual-inversion ``LearnScheduleIterator`` (started at step 0) reads it, so a schedule gives
the same rates on every host: pairs are ``rate:end_step``; an end step of -1 or a pair without one runs to the
end (and ends the list); end steps <= 0 otherwise are skipped; an end step past the run's last step ends the
list there; empty items are ignored.
"""

from __future__ import annotations

from lib_anima.errors import ArgumentError

INVALID = ('Invalid learning rate schedule. It should be a number or, for example, like "0.001:100, '
           '0.00001:1000, 1e-5:10000" to have lr of 0.001 until step 100, 0.00001 until 1000, and 1e-5 until 10000.')


def schedule_pairs(text: str, max_steps: int) -> list[tuple[float, int]]:
    """``(rate, end_step)`` pairs of a schedule for a run of `max_steps` steps."""
    pairs: list[tuple[float, int]] = []
    try:
        for item in text.split(","):
            if not item.strip():
                continue
            parts = item.split(":")
            if len(parts) != 2:  # a bare rate (or more colons: the first part) runs to the end
                pairs.append((float(parts[0]), max_steps))
                break
            end = int(parts[1])
            if end > 0:
                pairs.append((float(parts[0]), min(end, max_steps)))
                if end > max_steps:
                    break
            elif end == -1:
                pairs.append((float(parts[0]), max_steps))
                break
    except ValueError:
        raise ArgumentError(INVALID) from None
    if not pairs:
        raise ArgumentError(INVALID)
    return pairs
