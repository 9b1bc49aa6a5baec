"""Sizes in bytes from what users type: 5GB, 500MB, 2GiB, 1e9 (decimal and binary units, any case)."""

from __future__ import annotations

import re

UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '2GiB', '1e9' or a plain number; ValueError names what is wrong.

    Callers turn the ValueError into their own one-line error naming the option.
    """
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in UNITS:
        raise ValueError(f"{text!r} is not a size like 5GB or 2GiB")
    return int(float(m.group(1)) * UNITS[unit])
