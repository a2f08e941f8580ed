"""`specexec profile`: measure this machine, then tune quantization, placement, drafter and budget.

The cost model (DESIGN.md, auto-tuning): decode speed at budget b is

    tokens/s(b) = A(b) / mean over passes of (t(n) + d + o)

where A(b) is the tokens accepted per target pass (measured on a few Spec-Bench prompts), t(n)
the target's pass time for a tree of n nodes (timed on synthetic trees at the chosen placement,
then looked up at each calibration pass's real tree size), d the draft time and o the per-pass
overhead (sampling, detokenizing) measured in the same runs. The budget with the best predicted
speed is chosen, then a check run on other prompts measures what it really gives. With a GPU
target, overlapped drafting is predicted as A(b) / (max(t, d) + o): the budget is then the one
whose drafting fits the pass time on this hardware. Speeds are
decode speeds: the first pass (the prompt's prefill) is left out of both.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from specexec_app.paths import CONFIGS
from specexec_app.core.engine import Done, Pass
from specexec_app.config.settings import DecodeSettings
from specexec_app.core.tree import Tree, chain
from specexec_app.tools.prompts import CATEGORIES, bench_prompts

GB = 1e9

Say = Callable[[str], None]


# ---- the machine --------------------------------------------------------------------------

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


def measure_machine(device: torch.device, weights: Path | None) -> dict:
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
    return m


# ---- the model's costs --------------------------------------------------------------------

def pass_times(target, prefix: list[int], sizes: list[int], repeat: int = 3) -> dict[int, float]:
    """Seconds per target pass for a tree of n nodes on a `prefix`-long cache, per n."""
    sync = (lambda: torch.cuda.synchronize(target.device)) if target.device.type == "cuda" else (lambda: None)
    target.verify(prefix, Tree())  # fill the cache with the prefix once
    target.commit(Tree(), [])
    out = {}
    for n in sizes:
        tree = chain([prefix[-1]] * n)
        times = []
        for _ in range(repeat + 1):
            sync()
            t = time.perf_counter()
            target.verify(prefix, tree)  # not committed: the next sync drops the tree's entries
            sync()
            times.append(time.perf_counter() - t)
        out[n] = statistics.median(times[1:])
    return out


def lookup(times: dict[int, float], n: int) -> float:
    """Pass time at tree size n, linear between the measured sizes."""
    sizes = sorted(times)
    if n <= sizes[0]:
        return times[sizes[0]]
    for a, b in zip(sizes, sizes[1:]):
        if n <= b:
            return times[a] + (times[b] - times[a]) * (n - a) / (b - a)
    a, b = sizes[-2], sizes[-1]
    return times[b] + (times[b] - times[a]) * (n - b) / (b - a)


@dataclass
class Run:
    """The decode part (all passes but the first) of generations at one budget."""
    budget: int
    tokens: int = 0
    seconds: float = 0.0
    passes: list[tuple[int, int, float, float, float]] = field(default_factory=list)
    # (tree size, tokens accepted, draft s, target s, wall s of the pass)

    @property
    def accepted_per_pass(self) -> float:
        return self.tokens / len(self.passes) if self.passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def decode(pipe, prompts: list[str], settings: DecodeSettings) -> Run:
    run = Run(settings.budget)
    for prompt in prompts:
        pipe.target.kv.reset()
        pipe.drafter.reset()
        last = None
        for event in pipe.generate(pipe.encode(prompt), settings):
            now = time.perf_counter()
            if isinstance(event, Pass):
                if last is not None:  # the first pass holds the prefill: left out
                    run.passes.append((event.tree_size, event.accepted, event.draft_s,
                                       event.target_s, now - last))
                    run.tokens += event.accepted
                    run.seconds += now - last
                last = now
            elif isinstance(event, Done) and last is not None:
                run.seconds += time.perf_counter() - last
    return run


def predict(run: Run, times: dict[int, float]) -> dict:
    """The cost model's decode tokens/s for the passes of `run`."""
    if not run.passes:
        return {"tokens_per_s": 0.0}
    model_t = statistics.fmean(lookup(times, n) for n, *_ in run.passes)
    draft = statistics.fmean(p[2] for p in run.passes)
    overhead = statistics.fmean(max(0.0, p[4] - p[2] - p[3]) for p in run.passes)
    per_pass = model_t + draft + overhead
    return {"accepted_per_pass": run.accepted_per_pass, "pass_ms": model_t * 1000,
            "draft_ms": draft * 1000, "overhead_ms": overhead * 1000,
            "mean_tree": statistics.fmean(p[0] for p in run.passes),
            "tokens_per_s": run.accepted_per_pass / per_pass}


# ---- choices ------------------------------------------------------------------------------

def choose_quant(params: int, ram_free: int, device: torch.device) -> tuple[int, str]:
    """The most precise weights that fit host RAM with room to spare (the exact target is the
    quantized one you pick: 16-bit unless RAM forbids it)."""
    if device.type == "cpu":
        need = params * 4  # the CPU computes in float32
        if need <= 0.8 * ram_free:
            return 16, f"fits RAM in full precision ({need / GB:.1f} GB)"
    for bits in (16, 8, 4):
        need = params * bits // 8
        if need <= 0.8 * ram_free:
            return bits, f"{bits}-bit weights take {need / GB:.1f} GB of {ram_free / GB:.1f} GB free RAM"
    # Nothing fits RAM: what does not stream from disk on every pass (--offload auto), in 16 bits
    # from the safetensors (a folder from `specexec quantize --quant 4` reads a quarter of that).
    return 16, (f"even 4-bit ({params / 2 / GB:.1f} GB) does not fit the {ram_free / GB:.1f} GB "
                "of free RAM: the layers that do not fit stream from disk")


def profile_candidates(device: torch.device, quick: bool) -> list[int]:
    if device.type == "cpu":
        return [1, 8] if quick else [1, 4, 8, 16]
    return [16, 256] if quick else [16, 64, 256, 1024, 2048]


def tune(target: str | None, draft: str | None, device_name: str, gpu_memory: str | None,
         quant: int | None, quick: bool, trust_remote_code: bool, say: Say,
         load: Callable[..., tuple]) -> dict:
    """Measure, choose, check; returns the profile to save. `load(target, draft, budget, quant,
    offload, gpu_memory, drafter, device, trust)` builds a pipeline (the CLI's loader)."""
    from specexec_app.loading.sources import resolve
    from specexec_app.loading.checkpoint import count_params
    from specexec_app.config.presets import get_preset
    from specexec_app.loading.session import SELF_DRAFTS, make_drafter, pick_device

    dev = pick_device(device_name)
    name = target or "default"
    preset = get_preset(name)
    src = resolve(preset.target if preset else name, say)
    folder = Path(src.path)

    say("measuring the machine")
    machine = measure_machine(dev, folder)
    params = count_params(folder)
    if quant is None:
        quant, why_quant = choose_quant(params, int(machine["ram_free_gb"] * GB), dev)
    else:
        why_quant = "given"
    say(f"loading {name} ({quant}-bit)")
    pipe, opts, _ = load(target, draft, None, quant, None, gpu_memory, None, device_name,
                         trust_remote_code)
    candidates = [pipe.draft_name] + ([] if draft else other_drafts(pipe, dev, gpu_memory))
    drafters = {pipe.draft_name: pipe.drafter}

    categories = CATEGORIES[:2] if quick else CATEGORIES[:4]
    calib = [p for _, p in bench_prompts(categories, first=0)]
    check = [p for _, p in bench_prompts(categories, first=1)]
    max_new = 24 if quick else 64
    prefix = pipe.encode(calib[0])
    sizes = sorted({0, 1, *profile_candidates(dev, quick), 2 * max(profile_candidates(dev, quick))})
    say("timing target passes")
    times = pass_times(pipe.target, prefix + prefix[-1:] * (max_new // 2), sizes)

    rows = []
    for name_d in candidates:
        if name_d not in drafters:
            say(f"loading the candidate draft {name_d}")
            drafters[name_d] = make_drafter(name_d, None if name_d in SELF_DRAFTS else resolve(name_d),
                                            pipe.source, pipe.target.model, dev, pipe.vocab_size(),
                                            pipe.stop_ids)
        pipe.drafter = drafters[name_d]
        for b in profile_candidates(dev, quick):
            say(f"calibrating {name_d} at budget {b} on {len(calib)} Spec-Bench prompts")
            run = decode(pipe, calib, DecodeSettings(budget=b, max_new_tokens=max_new))
            rows.append({"draft": name_d, "budget": b} | predict(run, times)
                        | {"calibration_tokens_per_s": run.tokens_per_s})
    # Overlapped drafting hides the draft behind the pass: a pass then costs max(pass, draft), so
    # the best budget is the one whose drafting still fits the pass time on this hardware. Only
    # where the target computes on a GPU: on a CPU the two would share the same cores.
    overlap_ok = dev.type == "cuda"
    for r in rows:
        r["overlap_tokens_per_s"] = (r["accepted_per_pass"] * 1000 / (max(r["pass_ms"], r["draft_ms"])
                                                                     + r["overhead_ms"])
                                     if overlap_ok and r.get("pass_ms") else 0.0)
    best = max(rows, key=lambda r: max(r["tokens_per_s"], r["overlap_tokens_per_s"]))
    pipe.drafter, pipe.draft_name = drafters[best["draft"]], best["draft"]
    drafters.clear()  # the other candidates' weights can go
    dparams = own_params(pipe)
    overlap = best["overlap_tokens_per_s"] > best["tokens_per_s"] * 1.05
    predicted = best["overlap_tokens_per_s"] if overlap else best["tokens_per_s"]
    say(f"check run at budget {best['budget']} on {len(check)} other prompts")
    measured = decode(pipe, check, DecodeSettings(budget=best["budget"], max_new_tokens=max_new,
                                                  overlap=overlap))

    choice = {"target": name, "draft": pipe.draft_name, "quant": quant, "offload": opts.offload,
              "drafter": "auto", "budget": best["budget"], "overlap": overlap, "device": dev.type}
    if gpu_memory:
        choice["gpu_memory"] = gpu_memory
    placement = pipe.placement_text()
    speed = draft_speed(pipe, prefix, dev)
    choice["drafter"], why_drafter = choose_drafter(pipe, machine, speed, best, dparams)
    return {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine,
        "target": {"name": name, "parameters": params, "quant_reason": why_quant,
                   "placement": placement,
                   "pass_ms": {str(n): round(t * 1000, 2) for n, t in times.items()}},
        "draft": {"name": pipe.draft_name, "parameters": dparams, "speed": speed,
                  "placement_reason": why_drafter},
        "calibration": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                        for r in rows],
        "choice": choice,
        "predicted_tokens_per_s": round(predicted, 3),
        "measured_tokens_per_s": round(measured.tokens_per_s, 3),
        "measured_accepted_per_pass": round(measured.accepted_per_pass, 3),
    }


def own_params(pipe) -> int:
    """Parameters of the draft model that are not the target's own (a distilled draft shares the
    target's embedding and head)."""
    model = getattr(pipe.drafter, "model", None)
    if model is None:
        return 0
    target = {id(p) for p in pipe.target.model.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in target)


def other_drafts(pipe, dev: torch.device, gpu_memory: str | None) -> list[str]:
    """Drafts the profile also tries when none was named: each shipped distilled draft made for
    this target, and, for a target that streams through a GPU, its NF4 copy (SubSpec's quantized
    self-draft) when that copy takes at most half of the GPU memory budget."""
    from drafts.distilled import made_for
    from offload.packed import is_packed

    from specexec_app.loading.sources import SHIPPED_DRAFTS

    from specexec_app.loading.hf import draft_gpu_bytes
    from specexec_app.config.settings import parse_size

    out = [name for name, folder in SHIPPED_DRAFTS.items()
           if name != pipe.draft_name and made_for(folder, pipe.target.model)]
    p = pipe.target.placement
    if (dev.type == "cuda" and p is not None and p.streamed_layers and pipe.draft_name != "self-nf4"
            and not is_packed(pipe.source.path)):  # a packed target has no weights to copy
        budget = parse_size(gpu_memory) if gpu_memory else torch.cuda.get_device_properties(dev).total_memory
        if draft_gpu_bytes("self-nf4", pipe.source, None) <= budget / 2:
            out.append("self-nf4")
    return out


def choose_drafter(pipe, machine: dict, speed: dict, best: dict, dparams: int) -> tuple[str, str]:
    """Draft on the GPU, or on the CPU so that its GPU memory holds more target layers: whichever
    makes a pass (draft + streamed target) shorter."""
    if "cuda_ms" not in speed:
        return "auto", "the drafter runs where the target computes (no GPU in use)"
    if dparams == 0:
        return "auto", "the n-gram drafter needs no GPU memory"
    p = pipe.target.placement
    if p is None or p.streamed_layers == 0 or "cpu_ms" not in speed:
        return "gpu", "the target is resident: nothing to gain from freeing GPU memory"
    gpu_ms = speed["cuda_ms"]
    draft_bytes = dparams * 2
    freed = min(p.streamed_layers, draft_bytes // max(p.layer_bytes, 1))
    saved_ms = freed * p.packed_layer_bytes / (machine["h2d_pinned_gb_s"] * GB) * 1000
    extra_ms = best["draft_ms"] * (speed["cpu_ms"] / max(gpu_ms, 1e-6) - 1)
    if extra_ms < saved_ms:
        return "cpu", (f"on the CPU drafting costs {extra_ms:.0f} ms more per pass but frees room "
                       f"for {freed} more resident layers, saving {saved_ms:.0f} ms of streaming")
    return "gpu", (f"on the CPU drafting would cost {extra_ms:.0f} ms more per pass; the "
                   f"{freed} layers its GPU memory could hold save only {saved_ms:.0f} ms")


def draft_speed(pipe, prefix: list[int], dev: torch.device) -> dict:
    """Milliseconds to draft one 64-node tree after `prefix`, where the drafter can run."""
    drafter = pipe.drafter
    out = {}

    def time_it() -> float:
        drafter.reset()
        drafter.propose(prefix, 64)  # warm: fills the drafter's cache with the prefix
        t = time.perf_counter()
        drafter.propose(prefix, 64)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - t) * 1000

    model = getattr(drafter, "model", None)
    if model is None:
        return {"cpu_ms": round(time_it(), 3)}
    here = next(model.parameters()).device
    out[f"{here.type}_ms"] = round(time_it(), 3)
    drafter.reset()
    if here.type == "cuda":  # the same draft on the CPU, for the drafter placement choice
        import copy

        try:
            drafter.model = copy.deepcopy(model).to("cpu", torch.float32)
            out["cpu_ms"] = round(time_it(), 3)
        except (RuntimeError, ValueError, TypeError) as e:  # e.g. a bitsandbytes model
            out["cpu_ms_error"] = str(e).splitlines()[0][:120]
        finally:
            drafter.model = model
            drafter.reset()
    return out
