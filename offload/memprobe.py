"""Measuring what a pass allocates on a CPU: the peak of the bytes that torch's CPU allocator
hands out while a piece of code runs, over what it held when the code began (the profiler's
memory events: every allocation and free the allocator reports, kernels' own scratch included).
The plan's `work_bytes` must be at least this for a pass (tests/test_offload.py); on a GPU,
`torch.cuda.max_memory_allocated` is the same figure.

    with AllocationPeak() as probe:
        forward_tree(model, kv, prompt, tree)
    probe.peak   # bytes above the start at the highest point
    probe.held   # bytes still allocated at the end (the KV cache's growth, the logits)
"""

from __future__ import annotations

import json
import os
import tempfile

from torch.profiler import ProfilerActivity, profile


class AllocationPeak:
    def __init__(self) -> None:
        self.peak = self.held = 0
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> "AllocationPeak":
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:  # the chrome trace has every allocator event with its address and signed size
            self._prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        finally:
            os.unlink(path)
        mine: set[int] = set()  # addresses allocated inside: a free of anything older is ignored
        total = 0
        for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
            args = e["args"]
            if args.get("Device Type", 0) != 0:  # 0: the CPU
                continue
            size, addr = args["Bytes"], args["Addr"]
            if size > 0:
                mine.add(addr)
            elif addr in mine:
                mine.discard(addr)
            else:
                continue
            total += size
            self.peak = max(self.peak, total)
        self.held = total
