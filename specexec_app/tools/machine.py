"""Probes of the machine the profile tunes for: cores, RAM, the GPU and its host-to-device
bandwidth, the read speed of the weights' folder."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from specexec_app.config.profile import Machine

GB = 1e9


def _best_of(fn: Callable[[], float], repeat: int = 5) -> float:
    return min(fn() for _ in range(repeat))


def host_to_device_gb_s(device: torch.device, pinned: bool, size: int = 256 * 2**20) -> float:
    src = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(size, dtype=torch.uint8, device=device)

    def once() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=pinned)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000

    once()
    return size / _best_of(once) / GB


def ram_copy_gb_s(size: int = 256 * 2**20) -> float:
    src = torch.ones(size, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def once() -> float:
        t = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t

    once()
    return size / _best_of(once) / GB


def weight_files(path: Path) -> list[Path]:
    files = [p for ext in ("*.safetensors", "*.gguf", "*.bin") for p in sorted(path.glob(ext))]
    return [p for p in files if p.is_file()]


def drop_page_cache(path: Path) -> bool:
    """Ask the kernel to forget the cached pages of a file (its next read comes from the disk);
    False where it cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (AttributeError, OSError):
        return False
    return True


def disk_read_gb_s(folder: Path, readers: int, limit: int = 2**30,
                   window: int = 512 << 20) -> tuple[float, bool]:
    """Read speed of the weight files in `folder` (their first `limit` bytes), read the way the
    streamer reads a layer from disk (`window` bytes at a time, by `readers` threads), and whether
    the page cache could be dropped first (a cold read) or the figure may include cached pages."""
    from concurrent.futures import ThreadPoolExecutor

    from offload.store import DiskLayer

    reads, total = [], 0  # (file, offset, bytes)
    for path in weight_files(folder):
        nbytes = min(path.stat().st_size, limit - total)
        if nbytes <= 0:
            break
        reads += [(str(path), at, min(window, nbytes - at)) for at in range(0, nbytes, window)]
        total += nbytes
    if not total:
        return 0.0, False
    cold = all([drop_page_cache(Path(path)) for path in {path for path, _, _ in reads}])
    buffer = torch.empty(min(window, total), dtype=torch.uint8)
    with ThreadPoolExecutor(readers) as pool:
        parallel = pool if readers > 1 else None
        start = time.perf_counter()
        for path, at, nbytes in reads:
            DiskLayer([], nbytes, ((path, at, nbytes, 0),)).read_into(buffer, parallel)
        return total / max(time.perf_counter() - start, 1e-9) / GB, cold


def measure_machine(device: torch.device, weights: Path | None) -> Machine:
    vm = psutil.virtual_memory()
    m = {"os": platform.platform(terse=True), "cpu": platform.processor() or platform.machine(),
         "cpu_cores": psutil.cpu_count(logical=False) or 0, "cpu_threads": psutil.cpu_count() or 0,
         "torch_threads": torch.get_num_threads(),
         "ram_total_gb": round(vm.total / GB, 2), "ram_free_gb": round(vm.available / GB, 2),
         "ram_copy_gb_s": round(ram_copy_gb_s(), 2)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        m |= {"gpu": props.name, "gpu_memory_gb": round(total / GB, 2),
              "gpu_free_gb": round(free / GB, 2),
              "h2d_pinned_gb_s": round(host_to_device_gb_s(device, True), 2),
              "h2d_pageable_gb_s": round(host_to_device_gb_s(device, False), 2)}
    else:
        m |= {"gpu": "none"}
    if weights is not None:
        from offload.store import disk_readers

        speed, cold = disk_read_gb_s(weights, disk_readers(device))
        m |= {"weights_folder": str(weights), "disk_read_gb_s": round(speed, 2),
              "disk_read_cold": cold}
    return Machine(**m)
