"""`specexec profile`: tune quantization, placement, drafter and budget from a cost model and
measurements (the machine's own probes are in `machine.py`).

The cost model (the project's design notes, auto-tuning): decode speed at budget b is

    tokens/s(b) = A(b) / mean over passes of (t(n) + d + o)

where A(b) is the tokens accepted per target pass (measured on a few Spec-Bench prompts), t(n)
the target's pass time for a tree of n nodes (timed on synthetic trees at the chosen placement,
then looked up at each calibration pass's real tree size), d the draft time and o the per-pass
overhead (sampling, detokenizing) measured in the same runs. The budget with the best predicted
speed is chosen, then a check run on other prompts measures what it really gives. With a GPU
target, overlapped drafting is predicted as A(b) / (max(t, d(2b)) + o) (the tree drafted ahead
has twice the budget), and where that could pay, the check run measures the best budget with
and without overlap and keeps the faster. Speeds are decode speeds: the first pass (the prompt's
prefill) is left out of both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from specexec_app.config.profile import Choice, DraftReport, Machine, Profile, TargetReport
from specexec_app.config.settings import DecodeSettings, LoadSpec
from specexec_app.core.engine import Done, Pass
from specexec_app.core.tree import Tree, chain
from specexec_app.tools.machine import measure_machine
from specexec_app.tools.prompts import CATEGORIES, bench_prompts

GB = 1e9

Say = Callable[[str], None]


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

def choose_quant(params: int, ram_free: int, device: torch.device,
                 gguf: bool = False) -> tuple[int | None, str]:
    """The most precise weights that fit host RAM with room to spare (the exact target is the
    quantized one you pick: 16-bit unless RAM forbids it); a GGUF model as its blocks are (None:
    on a CPU the packed kernels compute from them)."""
    if gguf:
        return None, "the GGUF's own blocks (on a CPU, computed by the packed kernels)"
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


def choose_threads(target, context: list[int], budget: int) -> tuple[int, dict[str, float]]:
    """The CPU thread count (torch's intra-op threads, process-wide) at which a one-token pass
    plus a `budget`-node tree pass take least time on this machine, among 1, the physical cores
    and the logical ones; left set. Returns it and the ms of that pair at each count."""
    import psutil

    counts = sorted({1, psutil.cpu_count(logical=False) or 1, psutil.cpu_count() or 1,
                     torch.get_num_threads()})
    ms = {}
    for n in counts:
        torch.set_num_threads(n)
        times = pass_times(target, context, [0, budget])
        ms[str(n)] = round(1000 * (times[0] + times[budget]), 2)
    best = min(counts, key=lambda n: ms[str(n)])
    torch.set_num_threads(best)
    return best, ms


def profile_candidates(device: torch.device, quick: bool) -> list[int]:
    """Budgets the profile calibrates. On a CPU, trees of 4k - 1 nodes: with the root a pass has
    4k rows, which fill the row blocks of torch's int4 CPU kernel (4 rows a block: a pass of 9
    rows costs as much as one of 12)."""
    if device.type == "cpu":
        return [1, 3, 7] if quick else [1, 3, 7, 15]
    return [16, 256] if quick else [16, 64, 256, 1024, 2048]


def tune(spec: LoadSpec, name: str, gpu_memory: str | None, quant_given: bool, draft_given: bool,
         quick: bool, say: Say, load: Callable[[LoadSpec], object]) -> Profile:
    """Measure, choose, check; returns the profile to save. `spec` is what to load (the target
    `name` as the user called it; `quant_given`: keep `spec.quant`, else choose it from RAM;
    `draft_given`: time that draft alone, else the other drafts that fit this target too);
    `load(spec)` builds a pipeline (the CLI's loader, with its progress)."""
    from specexec_app.loading.checkpoint import count_params
    from specexec_app.loading.session import SELF_DRAFTS, make_drafter, pick_device
    from specexec_app.loading.sources import resolve

    dev = pick_device(spec.device)
    src = resolve(spec.target, say)
    folder = Path(src.path)
    say("measuring the machine")
    machine = measure_machine(dev, folder)
    params = count_params(folder, src.gguf_file)
    why_quant = "given"
    if not quant_given:
        quant, why_quant = choose_quant(params, int(machine.ram_free_gb * GB), dev,
                                        gguf=bool(src.gguf_file))
        spec = replace(spec, quant=quant)
    say(f"loading {name} ({f'{spec.quant}-bit' if spec.quant else 'as stored'})")
    pipe = load(spec)
    candidates = [pipe.draft_name] + ([] if draft_given else other_drafts(pipe, dev, gpu_memory))
    drafters = {pipe.draft_name: pipe.drafter}

    # Quick: one category of free text and one that copies from its prompt (where an n-gram
    # drafter proposes anything at all).
    categories = ["writing", "extraction"] if quick else CATEGORIES[:4]
    calib = [p for _, p in bench_prompts(categories, first=0)]
    check = [p for _, p in bench_prompts(categories, first=1)]
    max_new = 24 if quick else 64
    prefix = pipe.encode(calib[0])
    budgets = profile_candidates(dev, quick)
    sizes = sorted({0, 1, *budgets, 2 * max(budgets)})
    context = prefix + prefix[-1:] * (max_new // 2)
    threads, threads_ms = spec.threads, {}
    if dev.type == "cpu" and threads is None:
        say("timing target passes at each thread count")
        threads, threads_ms = choose_threads(pipe.target, context, max(budgets))
    say("timing target passes")
    times = pass_times(pipe.target, context, sizes)

    rows = []
    for name_d in candidates:
        if name_d not in drafters:
            say(f"loading the candidate draft {name_d}")
            drafters[name_d] = make_drafter(name_d, None if name_d in SELF_DRAFTS else resolve(name_d),
                                            pipe.source, pipe.target.model, dev, pipe.vocab_size(),
                                            pipe.stop_ids)
        pipe.drafter = drafters[name_d]
        for b in budgets:
            say(f"calibrating {name_d} at budget {b} on {len(calib)} Spec-Bench prompts")
            run = decode(pipe, calib, DecodeSettings(budget=b, max_new_tokens=max_new))
            rows.append({"draft": name_d, "budget": b} | predict(run, times)
                        | {"calibration_tokens_per_s": run.tokens_per_s})
    predict_overlap(rows, dev.type == "cuda")
    best = choose_best(rows)
    pipe.drafter, pipe.draft_name = drafters[best["draft"]], best["draft"]
    drafters.clear()  # the other candidates' weights can go
    dparams = own_params(pipe)
    # Overlap or not: measured both ways on the check prompts where the model says it could pay.
    tries = [False] + ([True] if best["overlap_tokens_per_s"] > best["tokens_per_s"] * 0.9 else [])
    measured = {}
    for overlap in tries:
        say(f"check run at budget {best['budget']}{' with overlap' if overlap else ''} on "
            f"{len(check)} other prompts")
        measured[overlap] = decode(pipe, check, DecodeSettings(
            budget=best["budget"], max_new_tokens=max_new, overlap=overlap))
    overlap = max(measured, key=lambda o: measured[o].tokens_per_s)
    predicted = best["overlap_tokens_per_s"] if overlap else best["tokens_per_s"]

    speed = draft_speed(pipe, prefix, dev)
    drafter, why_drafter = choose_drafter(pipe, machine, speed, best, dparams)
    choice = Choice(target=name, draft=pipe.draft_name, quant=spec.quant, offload=spec.offload,
                    drafter=drafter, budget=best["budget"], overlap=overlap, device=dev.type,
                    gpu_memory=gpu_memory, threads=threads)
    return Profile(
        created=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine,
        target=TargetReport(name=name, parameters=params, quant_reason=why_quant,
                            placement=pipe.placement_text(),
                            pass_ms={str(n): round(t * 1000, 2) for n, t in times.items()},
                            threads_pass_ms=threads_ms),
        draft=DraftReport(name=pipe.draft_name, parameters=dparams, speed=speed,
                          placement_reason=why_drafter),
        calibration=[{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                     for r in rows],
        choice=choice, predicted_tokens_per_s=round(predicted, 3),
        measured_tokens_per_s=round(measured[overlap].tokens_per_s, 3),
        measured_accepted_per_pass=round(measured[overlap].accepted_per_pass, 3))


TIE = 0.03  # predictions this close to the best are within calibration noise


def choose_best(rows: list[dict]) -> dict:
    """The calibration row to keep: the fastest prediction (with or without overlap), except that
    rows within `TIE` of it are a tie, which the smallest budget wins (then the earlier row: the
    named draft before the other candidates). A bigger tree must earn its memory and its cost
    when it misses; when the drafter proposed nothing on the calibration prompts, every budget
    predicts the same and this keeps the choice from being noise."""
    def speed(r: dict) -> float:
        return max(r["tokens_per_s"], r["overlap_tokens_per_s"])

    top = max(speed(r) for r in rows)
    return min((r for r in rows if speed(r) >= (1 - TIE) * top), key=lambda r: r["budget"])


def predict_overlap(rows: list[dict], gpu: bool) -> None:
    """Overlapped drafting hides the draft behind the pass: a pass then costs max(pass, draft of
    the tree drafted ahead), and that tree is twice the budget (it hangs one level below the
    guessed leaf). Its draft time is the calibration's at 2b, or twice that at b where 2b was not
    calibrated. Only where the target computes on a GPU: on a CPU the two share the cores."""
    for r in rows:
        at_2b = next((o for o in rows if o["draft"] == r["draft"] and o["budget"] == 2 * r["budget"]),
                     None)
        draft_ms = at_2b["draft_ms"] if at_2b else 2 * r.get("draft_ms", 0.0)
        r["overlap_draft_ms"] = draft_ms
        r["overlap_tokens_per_s"] = (r["accepted_per_pass"] * 1000 /
                                     (max(r["pass_ms"], draft_ms) + r["overhead_ms"])
                                     if gpu and r.get("pass_ms") else 0.0)


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


def choose_drafter(pipe, machine: Machine, speed: dict, best: dict, dparams: int) -> tuple[str, str]:
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
    freed = min(p.streamed_layers, draft_bytes // max(p.resident_layer_bytes, 1))
    saved_ms = freed * p.packed_layer_bytes / (machine.h2d_pinned_gb_s * GB) * 1000
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
