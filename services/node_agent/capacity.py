"""What this host offers: CPUs, memory and GPUs (from NVML when present, or as declared)."""

from __future__ import annotations

import os

from shared import schemas


def detect_gpus() -> list[schemas.GpuInfo]:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: a CPU host
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(
                schemas.GpuInfo(index=i, name=name if isinstance(name, str) else name.decode(), memory_bytes=mem)
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def gpus_for(declared: int | None) -> list[schemas.GpuInfo]:
    if declared is not None:
        return [schemas.GpuInfo(index=i) for i in range(declared)]
    return detect_gpus()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
