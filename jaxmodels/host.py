"""The CPU this process runs on, as far as it moves results: how fast, and how it rounds.

XLA compiles for the CPU it runs on, its widest vector instructions among the rest, so two kinds
of CPU time the same program differently and can round it differently. Small training runs carry
that rounding into their outcomes (the demo's picks differ between an AVX-512 machine and an AMD
EPYC without it), so reports and benchmarks record the kind they ran on.
"""

from __future__ import annotations

import functools
import pathlib
import platform

_CPUINFO = pathlib.Path("/proc/cpuinfo")


@functools.cache
def cpu_description() -> dict[str, str]:
    """The CPU: architecture, vendor, model name and widest vector instructions.

    Returns:
      {"kind": e.g. 'x86_64-AuthenticAMD-avx2' (architecture, vendor, vector width), "model":
      the model name, e.g. 'AMD EPYC'}. Where /proc/cpuinfo is missing (not Linux) the kind is
      the architecture alone and the model is `platform.processor()`.
    """
    fields: dict[str, str] = {}
    if _CPUINFO.exists():
        for line in _CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first core's
    flags = set(fields.get("flags", "").split())
    width = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    kind = "-".join(filter(None, (platform.machine(), fields.get("vendor_id"), width)))
    return {"kind": kind, "model": fields.get("model name") or platform.processor() or "unknown"}
