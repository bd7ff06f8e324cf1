"""Process memory for the CPU benchmarks (Linux /proc): current and peak RSS, peak reset."""
from __future__ import annotations


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_mb() -> float:
    return status_kb("VmRSS") / 1024


def peak_mb() -> float:
    """Peak RSS since the process start or the last :func:`reset_peak`."""
    return status_kb("VmHWM") / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
