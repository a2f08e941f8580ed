"""`specexec bench`: SpecExec against its peers on Spec-Bench prompts, in one run.

Methods, on the same target, draft, weights and placement: (1) `hf-generate`, transformers'
`generate` (when the target is offloaded: with accelerate's `device_map` offload, in a process
of its own once ours has released its models); (2) `ours-ar`,
our target decoding one token per pass; (3) `chain-k`, classic speculative decoding with one
draft chain of k tokens; (4) `specexec-b`, SpecExec trees of budget b, and the largest budget
with drafting overlapped with verification (`-overlap`). Greedy and sampled
(temperature 0.6, top-p 0.9). Every figure here is measured on the models named in the output;
nothing is combined from other runs.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from transformers import GenerationConfig

from drafts.chain import ChainDrafter, NoDraft

from specexec_app.core.engine import Done, generate
from specexec_app.files import write_atomic
from specexec_app.config.settings import DecodeSettings
from specexec_app.tools.prompts import bench_prompts

QUICK_CATEGORIES = ["coding", "extraction", "summarization"]
ALL_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                  "humanities", "translation", "summarization", "qa", "math_reasoning", "rag"]
MODES = {"greedy": (0.0, 1.0), "t0.6": (0.6, 0.9)}

Say = Callable[[str], None]


def hf_generate(model, ids: list[int], settings: DecodeSettings, stop_ids: set[int]):
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    kwargs = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=sorted(stop_ids),
                  pad_token_id=min(stop_ids))
    if settings.temperature > 0:
        torch.manual_seed(settings.seed or 0)
        kwargs |= dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                       top_k=0)
    else:
        kwargs |= dict(do_sample=False)
    # Under a blank generation config, not the checkpoint's: its repetition penalty, top-k or
    # min-p (Qwen2.5-Instruct's sets 1.05, 20, ...) would apply even to greedy, and the baseline
    # would not be the model's own distribution that ours follows. (A config passed to generate
    # is filled in from the model's, so the model's own is swapped for the call.)
    own, model.generation_config = model.generation_config, GenerationConfig()
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids], device=device), **kwargs)[0, len(ids):].tolist()
        wall = time.perf_counter() - start
    finally:
        model.generation_config = own
    passes = len(out)  # one forward per token drawn, a final stop token included
    while out and out[-1] in stop_ids:
        out.pop()
    return out, {"new_tokens": len(out), "wall_s": wall, "target_passes": passes,
                 "draft_s": 0.0, "target_s": wall}


def ours(pipe, drafter, ids: list[int], settings: DecodeSettings):
    drafter.reset()
    pipe.target.kv.reset()
    done = None
    for event in generate(pipe.target, drafter, ids, settings, pipe.tokenizer, pipe.stop_ids):
        if isinstance(event, Done):
            done = event
    s = done.stats
    return done.token_ids, {"new_tokens": s.new_tokens, "wall_s": s.wall_s,
                            "target_passes": s.target_passes, "draft_s": s.draft_s,
                            "target_s": s.target_s}


def methods(pipe, budgets: list[int], chains: list[int]) -> list[tuple[str, object, int]]:
    out = [("ours-ar", NoDraft(), 1)]
    chain = ChainDrafter(pipe.drafter)
    out += [(f"chain-{k}", chain, k) for k in chains]
    out += [(f"specexec-{b}", pipe.drafter, b) for b in budgets]
    out.append((f"specexec-{max(budgets)}-overlap", pipe.drafter, max(budgets)))
    return out


def hf_rows(model, encoded, modes: list[str], max_new: int, stop_ids: set[int]) -> list[dict]:
    """transformers' `generate` on `model` over every prompt in every mode (after a warm-up), as
    rows of `run`."""
    rows = []
    hf_generate(model, encoded[0][1], DecodeSettings(max_new_tokens=4), stop_ids)
    for mode in modes:
        temperature, top_p = MODES[mode]
        for i, (cat, ids) in enumerate(encoded):
            settings = DecodeSettings(temperature=temperature, top_p=top_p,
                                      max_new_tokens=max_new, seed=i)
            out, r = hf_generate(model, ids, settings, stop_ids)
            rows.append({"mode": mode, "method": "hf-generate", "budget": 0, "category": cat,
                         "prompt": i, "out": out, **r})
    return rows


def run(pipe, prompts: list[tuple[str, str]], budgets: list[int], chains: list[int],
        max_new: int, modes: list[str], say: Say, baseline: Callable) -> list[dict]:
    """Every method on every prompt in every mode: ours here, then transformers' `generate`
    through `baseline(encoded, modes, max_new)` (`hf_rows`, in this process or, for the
    accelerate-offloaded baseline, in one of its own)."""
    rows = []
    encoded = [(cat, pipe.encode(p)) for cat, p in prompts]
    # Warm up once (first calls allocate and pick kernels).
    ours(pipe, pipe.drafter, encoded[0][1], DecodeSettings(budget=budgets[0], max_new_tokens=4))
    for mode in modes:
        temperature, top_p = MODES[mode]
        for name, drafter, budget in methods(pipe, budgets, chains):
            say(f"{mode}: {name}")
            for i, (cat, ids) in enumerate(encoded):
                settings = DecodeSettings(budget=budget, temperature=temperature,
                                          top_p=top_p, max_new_tokens=max_new, seed=i,
                                          overlap=name.endswith("-overlap"))
                out, r = ours(pipe, drafter, ids, settings)
                rows.append({"mode": mode, "method": name, "budget": budget, "category": cat,
                             "prompt": i, "out": out, **r})
    say("transformers generate")
    rows += baseline(encoded, modes, max_new)
    rows.sort(key=lambda r: (modes.index(r["mode"]), r["method"] != "hf-generate"))  # as tabled
    reference = {(r["mode"], r["prompt"]): r["out"] for r in rows if r["method"] == "hf-generate"}
    for r in rows:  # greedy: is every method's text generate's?
        ref = reference.get((r["mode"], r["prompt"]))
        r["exact"] = r.pop("out") == ref if r["mode"] == "greedy" and ref is not None else None
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per mode and method (and per category): tokens/s, accepted/pass, pass and draft ms,
    speedups over hf-generate and ours-ar."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["mode"], r["method"], "all")].append(r)
        groups[(r["mode"], r["method"], r["category"])].append(r)
    table = {}
    for key, rs in groups.items():
        tokens = sum(r["new_tokens"] for r in rs)
        wall = sum(r["wall_s"] for r in rs)
        passes = sum(r["target_passes"] for r in rs)
        exact = [r["exact"] for r in rs if r["exact"] is not None]
        table[key] = {"mode": key[0], "method": key[1], "category": key[2], "budget": rs[0]["budget"],
                      "tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0,
                      "accepted_per_pass": tokens / passes if passes else 0.0,
                      "pass_ms": sum(r["target_s"] for r in rs) / passes * 1000 if passes else 0.0,
                      "draft_ms": sum(r["draft_s"] for r in rs) / passes * 1000 if passes else 0.0,
                      "exact": all(exact) if exact else None}
    for row in table.values():
        for base in ("hf-generate", "ours-ar"):
            ref = table.get((row["mode"], base, row["category"]))
            row[f"speedup_vs_{base}"] = (row["tokens_per_s"] / ref["tokens_per_s"]
                                         if ref and ref["tokens_per_s"] else 0.0)
    return table


def markdown(summary: dict, header: str) -> str:
    lines = [header, "", "| mode | method | tok/s | accepted/pass | pass ms | draft ms | "
             "x hf-generate | x ours-ar | greedy exact |", "|---|---|---|---|---|---|---|---|---|"]
    for row in summary.values():
        if row["category"] != "all":
            continue
        exact = {True: "yes", False: "**no**", None: "-"}[row["exact"]]
        lines.append(f"| {row['mode']} | {row['method']} | {row['tokens_per_s']:.2f} | "
                     f"{row['accepted_per_pass']:.2f} | {row['pass_ms']:.1f} | {row['draft_ms']:.1f} | "
                     f"{row['speedup_vs_hf-generate']:.2f} | {row['speedup_vs_ours-ar']:.2f} | {exact} |")
    cats = sorted({r["category"] for r in summary.values()} - {"all"})
    names = list(dict.fromkeys(r["method"] for r in summary.values()))
    for mode in dict.fromkeys(r["mode"] for r in summary.values()):
        lines += ["", f"tokens/s per category ({mode}):", "",
                  "| method | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for name in names:
            cells = [summary.get((mode, name, c), {}).get("tokens_per_s", 0.0) for c in cats]
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary.values() if r["category"] == "all"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    written = []
    for metric, label, fname in (("accepted_per_pass", "tokens accepted per target pass",
                                  "accepted_per_pass.png"),
                                 ("tokens_per_s", "tokens/s", "tokens_per_s.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in modes:
            for family, style in (("specexec", "o-"), ("chain", "s--")):
                pts = sorted((r["budget"], r[metric]) for r in rows
                             if r["mode"] == mode and r["method"].startswith(family))
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{family} ({mode})")
            if metric == "tokens_per_s":
                for base, ls in (("hf-generate", ":"), ("ours-ar", "-.")):
                    ref = next((r for r in rows if r["mode"] == mode and r["method"] == base), None)
                    if ref:
                        ax.axhline(ref[metric], linestyle=ls, color="gray", linewidth=1,
                                   label=f"{base} ({mode})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("draft budget (tree nodes) or chain length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)
    return written


def bench(pipe, out: Path, quick: bool, budgets: list[int], chains: list[int], max_new: int,
          per_category: int, modes: list[str], say: Say) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cats = QUICK_CATEGORIES if quick else ALL_CATEGORIES
    prompts = bench_prompts(cats, count=per_category)
    notes: list[str] = []
    if pipe.target.placement is None:
        baseline = lambda *job: hf_rows(pipe.target.model, *job, pipe.stop_ids)  # noqa: E731
    else:  # offloaded: accelerate's baseline, once ours is freed
        baseline = lambda *job: accelerate_baseline(pipe, *job, notes=notes)  # noqa: E731
    rows = run(pipe, prompts, budgets, chains, max_new, modes, say, baseline)
    summary = summarize(rows)
    meta = {"date": datetime.date.today().isoformat(), "machine": machine(pipe),
            "target": pipe.target_name, "draft": pipe.draft_name,
            "placement": pipe.placement_text(), "prompts": len(prompts),
            "categories": cats, "max_new_tokens": max_new, "budgets": budgets, "chains": chains,
            "figures": "all measured in this run on the models named here"}
    header = (f"SpecExec bench, {meta['date']}, {meta['machine']}: target {pipe.target_name}, "
              f"draft {pipe.draft_name}, {pipe.placement_text()}; {len(prompts)} Spec-Bench "
              f"prompts ({', '.join(cats)}), {max_new} new tokens each; all figures measured "
              "in this run.")
    write_atomic(out / "results.json", json.dumps(
        meta | {"summary": list(summary.values()), "runs": rows}, indent=1) + "\n")
    write_atomic(out / "results.md", markdown(summary, header))
    files = [out / "results.json", out / "results.md"]
    try:
        files += plots(summary, out)
    except ImportError:
        notes.append('no plots: they need matplotlib (pip install -e ".[bench]")')
    return {"summary": summary, "files": files, "header": header, "notes": notes}


def machine(pipe) -> str:
    dev = pipe.target.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "no GPU"
    return (f"{platform.machine()}, {psutil.cpu_count()} CPU threads, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}, torch {torch.__version__}")


def accelerate_baseline(pipe, encoded, modes: list[str], max_new: int, notes: list[str]) -> list[dict]:
    """transformers' `generate` over the same checkpoint with accelerate's `device_map` offload,
    within the GPU memory budget our placement had (the baseline most people run), and with the
    RAM ours held when it streams from disk (accelerate's disk offload). It runs in a process of
    its own after ours has released its models: side by side in one process, a target that fills
    the GPU leaves the baseline nothing, and a 70B would be held twice in RAM. A failure there is
    a note, not the end of the benchmark."""
    import gc
    import subprocess
    import sys
    import tempfile

    p, dev, src = pipe.target.placement, pipe.target.device, pipe.source
    memory, offload_folder = {"cpu": "1000GiB"}, None
    if p.source == "disk":  # ours reads its streamed layers from disk: so does the baseline
        memory["cpu"] = p.fixed_bytes + p.resident_layers * p.layer_bytes if dev.type == "cpu" else 2**30
        offload_folder = tempfile.mkdtemp(prefix="specexec-accelerate-")
    if dev.type == "cuda":
        memory[str(dev.index or 0)] = p.budget_bytes or torch.cuda.mem_get_info(dev)[0]
    job = {"path": src.path, "gguf_file": src.gguf_file, "device": dev.type, "memory": memory,
           "offload_folder": offload_folder, "modes": modes, "max_new": max_new,
           "stop_ids": sorted(pipe.stop_ids), "encoded": encoded}
    if pipe.target.streamer is not None:
        pipe.target.streamer.close()
    pipe.target.model = pipe.target.streamer = pipe.drafter = None  # ours, released
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory(prefix="specexec-bench-") as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "rows.json"
        job_file.write_text(json.dumps(job))
        done = subprocess.run([sys.executable, "-m", "specexec_app.tools.bench", str(job_file),
                               str(out_file)], capture_output=True, text=True)
        if offload_folder:
            import shutil

            shutil.rmtree(offload_folder, ignore_errors=True)
        if done.returncode != 0 or not out_file.exists():
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            notes.append(f"the accelerate baseline failed ({last}): no hf-generate rows")
            return []
        return json.loads(out_file.read_text())


def _baseline_process(job_file: str, out_file: str) -> None:
    """The accelerate baseline's own process (`accelerate_baseline`): rows as `run` makes them."""
    from transformers import AutoModelForCausalLM

    job = json.loads(Path(job_file).read_text())
    memory = {int(k) if k.isdigit() else k: v for k, v in job["memory"].items()}
    extra = {"offload_folder": job["offload_folder"]} if job["offload_folder"] else {}
    model = AutoModelForCausalLM.from_pretrained(
        job["path"], gguf_file=job["gguf_file"],
        dtype=torch.bfloat16 if job["device"] == "cuda" else torch.float32,
        local_files_only=True, device_map="auto", max_memory=memory, **extra)
    rows = hf_rows(model, job["encoded"], job["modes"], job["max_new"], set(job["stop_ids"]))
    write_atomic(Path(out_file), json.dumps(rows))


if __name__ == "__main__":
    import sys

    _baseline_process(*sys.argv[1:3])
