"""The `specexec` command. Only this module (and the REPL) prints."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from specexec_app.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Exact SpecExec speculative decoding: chat with a big model on a small machine.")
err = Console(stderr=True, highlight=False)
PROFILE_TIP = "[dim]tip: `specexec profile` tunes the budget and placement to this machine[/]"


@app.callback()
def _group() -> None:
    """Exact SpecExec speculative decoding: chat with a big model on a small machine."""


@contextmanager
def friendly_errors():
    """Bad input and known failures end in one line on stderr and a non-zero exit."""
    try:
        yield
    except UserError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("\ninterrupted")
        raise typer.Exit(130) from None


def format_stats(stats) -> str:
    return (f"{stats.new_tokens} tokens in {stats.wall_s:.2f} s, {stats.tokens_per_s:.2f} tok/s | "
            f"{stats.accepted_per_pass:.2f} accepted/pass over {stats.target_passes} passes "
            f"({stats.pass_s * 1000:.0f} ms/pass) | draft {stats.draft_s:.2f} s, "
            f"target {stats.target_s:.2f} s"
            + (f" | streamed {stats.streamed_gb_per_s:.1f} GB/s" if stats.streamed_bytes else "")
            + f" | stop: {stats.stop_reason}")


Target = Annotated[Optional[str], typer.Option("--target", "-t", show_default=False, help="Preset name (specexec models), model folder, .gguf file, or repo id in the local HF cache. Default: the profile's target, else 'default'.")]
Draft = Annotated[Optional[str], typer.Option("--draft", "-d", show_default=False, help="'ngram', 'self-int8', 'self-nf4', 'smollm2-distilled', a preset (its draft), a folder from `specexec distill`, or a draft model named like --target. Default: the profile's, else the preset's, else ngram.")]
Budget = Annotated[Optional[int], typer.Option(show_default=False, help="Draft tree nodes verified per target pass (>= 1). Default: the profile's, else the preset's.")]
Temperature = Annotated[float, typer.Option(help="0 = greedy (exactly the target's greedy output).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")]
MaxNew = Annotated[int, typer.Option(help="Most tokens to generate per reply.")]
Seed = Annotated[Optional[int], typer.Option(show_default=False, help="Seed for sampling; the same seed repeats the output. Default: none.")]
System = Annotated[Optional[str], typer.Option(show_default=False, help="System prompt. Default: the chat template's own.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Offload = Annotated[Optional[str], typer.Option(show_default=False, help="auto: stream the target's layers only if it does not fit the GPU, from RAM, or from disk if RAM is short too; always: stream from RAM (even on CPU); disk: stream from disk (16-bit safetensors, or a folder from `specexec quantize`); never. Default: the profile's, else auto.")]
Quant = Annotated[Optional[int], typer.Option(show_default=False, help="Target weights: 16, 8 (int8) or 4 (NF4) bits. Default: the profile's, else 16.")]
GpuMemory = Annotated[Optional[str], typer.Option(show_default=False, help="GPU memory the target may use, e.g. 24GiB. Default: the profile's, else what is free.")]
DrafterDev = Annotated[Optional[str], typer.Option("--drafter", show_default=False, help="Where a draft model runs: auto (with the target), gpu or cpu. Default: the profile's, else auto.")]
Overlap = Annotated[Optional[bool], typer.Option("--overlap/--no-overlap", show_default=False, help="Draft the next tree on a thread while the target verifies this one (pays when a pass is slow: an offloaded target). Default: the profile's, else off.")]
ContextSize = Annotated[Optional[int], typer.Option("--context", show_default=False, help="Most tokens a conversation holds (prompt and replies); GPU memory for the KV cache is kept for this many. Default: 8192, or the model's limit if lower.")]
TrustRemote = Annotated[bool, typer.Option(help="Allow model code from the checkpoint (off unless asked).")]


def load_pipeline(target, draft, budget, quant, offload, gpu_memory, drafter, device,
                  trust_remote_code, console: Console = err, use_profile: bool = True,
                  overlap: bool | None = None, context: int | None = None):
    """Options + saved profile -> a ready pipeline (spinner and layer progress on `console`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from specexec_app.config.profile import choose, load_profile
    from specexec_app.loading.session import build
    from specexec_app.config.settings import parse_size

    profile = load_profile() if use_profile else None
    opts = choose(target, draft, budget, quant, offload, gpu_memory, drafter, profile, overlap)
    size = parse_size(opts.gpu_memory) if opts.gpu_memory else None
    bar = Progress(TextColumn("placing layers"), BarColumn(), MofNCompleteColumn(),
                   console=console, transient=True)
    task = None

    def progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            status.stop()
            bar.start()
            task = bar.add_task("layers", total=total)
        bar.update(task, completed=done)
        if done == total:
            bar.stop()
            status.start()

    with console.status("loading models...", spinner="dots") as status:
        try:
            pipe = build(opts.target, opts.draft, device, trust_remote_code,
                         status=lambda msg: status.update(msg + "..."), offload=opts.offload,
                         quant=opts.quant, gpu_memory=size, drafter_device=opts.drafter,
                         progress=progress, budget=opts.budget, context=context)
        finally:
            bar.stop()
    if opts.budget is not None:
        pipe.default_budget = opts.budget
    return pipe, opts, profile


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from stdin.")],
    target: Target = None,
    draft: Draft = None,
    budget: Budget = None,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    max_new_tokens: MaxNew = 256,
    seed: Seed = None,
    raw: Annotated[bool, typer.Option(help="No chat template: continue PROMPT as plain text.")] = False,
    system: System = None,
    stats: Annotated[bool, typer.Option(help="Print a stats line on stderr.")] = False,
    stats_json: Annotated[Optional[Path], typer.Option(show_default=False, help="Write the run's stats as JSON to this file.")] = None,
    device: Device = "auto",
    offload: Offload = None,
    quant: Quant = None,
    gpu_memory: GpuMemory = None,
    drafter: DrafterDev = None,
    overlap: Overlap = None,
    context: ContextSize = None,
    trust_remote_code: TrustRemote = False,
) -> None:
    """Generate one reply to PROMPT, streamed to stdout; diagnostics go to stderr."""
    from specexec_app.core.engine import Done, Notice, Text
    from specexec_app.config.settings import DecodeSettings

    with friendly_errors():
        if prompt == "-":
            prompt = sys.stdin.read()
        if not prompt.strip():
            raise UserError("the prompt is empty")
        settings = DecodeSettings(budget=budget if budget is not None else 1, temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, seed=seed)
        pipe, opts, profile = load_pipeline(target, draft, budget, quant, offload, gpu_memory,
                                            drafter, device, trust_remote_code, overlap=overlap,
                                            context=context)
        settings.overlap = opts.overlap
        if pipe.target.placement is not None:
            err.print(f"target: {pipe.placement_text()}", soft_wrap=True)
        if profile is None and err.is_terminal:
            err.print(PROFILE_TIP)
        settings.budget = pipe.default_budget
        ids = pipe.encode(prompt, raw=raw, system=system)
        done = None
        try:
            for event in pipe.generate(ids, settings):
                if isinstance(event, Text) and event.text:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, Notice):
                    err.print(f"note: {event.message}", soft_wrap=True)
                elif isinstance(event, Done):
                    done = event
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            raise
        if not raw:
            sys.stdout.write("\n")
        sys.stdout.flush()
        if stats:
            err.print(format_stats(done.stats), soft_wrap=True)
        if stats_json:
            data = done.stats.to_dict() | {"target": pipe.target_name, "draft": pipe.draft_name,
                                           "budget": settings.budget,
                                           "temperature": settings.temperature}
            stats_json.write_text(json.dumps(data, indent=2) + "\n")


@app.command()
def chat(
    target: Target = None,
    draft: Draft = None,
    budget: Budget = None,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    max_new_tokens: MaxNew = 512,
    seed: Seed = None,
    system: System = None,
    footer: Annotated[bool, typer.Option(help="A one-line stats footer after each reply.")] = True,
    history: Annotated[bool, typer.Option(help="Keep input history across sessions (arrow keys work either way).")] = True,
    device: Device = "auto",
    offload: Offload = None,
    quant: Quant = None,
    gpu_memory: GpuMemory = None,
    drafter: DrafterDev = None,
    overlap: Overlap = None,
    context: ContextSize = None,
    trust_remote_code: TrustRemote = False,
) -> None:
    """Chat with the model in the terminal. /help lists the commands; Ctrl+C stops a reply."""
    from specexec_app.ui.chat import ChatREPL, enable_history
    from specexec_app.config.settings import DecodeSettings

    out = Console(highlight=False)
    import signal

    # Ctrl+C must reach the REPL even when the shell that started us ignored SIGINT (a job started
    # in the background by a script): Python leaves an ignored SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with friendly_errors():
        settings = DecodeSettings(budget=budget if budget is not None else 1, temperature=temperature,
                                  top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
        pipe, opts, profile = load_pipeline(target, draft, budget, quant, offload, gpu_memory,
                                            drafter, device, trust_remote_code, console=out,
                                            overlap=overlap, context=context)
        settings.budget, settings.overlap = pipe.default_budget, opts.overlap
        if history:
            import platformdirs

            enable_history(Path(platformdirs.user_state_dir("specexec")) / "chat_history")
        placement = pipe.placement_text()
        out.print(f"[bold]{pipe.target_name}[/] with draft [bold]{pipe.draft_name}[/], budget "
                  f"{settings.budget}, {placement}"
                  + (" (tuned by your profile)" if opts.from_profile else ""), soft_wrap=True)
        if profile is None:
            out.print(PROFILE_TIP)
        out.print("[dim]/help for commands, /exit or Ctrl+D to leave, Ctrl+C stops a reply[/]")
        ChatREPL(pipe, settings, out, system=system, footer=footer, placement=placement).loop()


@app.command()
def profile(
    target: Target = None,
    draft: Draft = None,
    device: Device = "auto",
    gpu_memory: Annotated[Optional[str], typer.Option(show_default=False, help="Tune for this much GPU memory (e.g. 12GiB, to stand in for a consumer GPU). Default: what is free.")] = None,
    quant: Annotated[Optional[int], typer.Option(show_default=False, help="Weights in 16, 8 or 4 bits. Default: the most precise that fits RAM.")] = None,
    quick: Annotated[bool, typer.Option(help="Fewer prompts, budgets and tokens (a rough profile in seconds).")] = False,
    show: Annotated[bool, typer.Option(help="Print the saved profile and exit.")] = False,
    reset: Annotated[bool, typer.Option(help="Forget the saved profile and exit.")] = False,
    trust_remote_code: TrustRemote = False,
) -> None:
    """Measure this machine, tune quantization, placement, drafter and budget, and save the result
    for `run` and `chat`."""
    from specexec_app.config.profile import forget_profile, load_profile, profile_path, save_profile
    from specexec_app.tools.tune import tune

    out = Console(highlight=False)
    with friendly_errors():
        if reset:
            gone = forget_profile()
            out.print(f"Forgot {profile_path()}." if gone else "There is no saved profile.")
            return
        if show:
            data = load_profile()
            if data is None:
                raise UserError(f"no saved profile at {profile_path()}; run `specexec profile`")
            show_profile(out, data)
            out.print(f"[dim]{profile_path()}[/]")
            return
        with out.status("profiling...", spinner="dots") as status:
            data = tune(target, draft, device, gpu_memory, quant, quick, trust_remote_code,
                        say=lambda msg: status.update(msg + "..."),
                        load=lambda *a: load_pipeline(*a, console=out, use_profile=False))
        show_profile(out, data)
        path = save_profile(data)
        out.print(f"Saved to {path}; `run` and `chat` use it unless options say otherwise.")


def show_profile(out: Console, data: dict) -> None:
    from rich.table import Table

    m = data.get("machine", {})
    t = Table(title="this machine", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    rows = [("CPU", f"{m.get('cpu', '?')}: {m.get('cpu_cores', '?')} cores, {m.get('cpu_threads', '?')} threads"),
            ("RAM", f"{m.get('ram_total_gb', 0):.1f} GB, {m.get('ram_free_gb', 0):.1f} GB free, copies at {m.get('ram_copy_gb_s', 0):.1f} GB/s"),
            ("GPU", m.get("gpu", "none") if m.get("gpu", "none") == "none" else
             f"{m['gpu']}: {m['gpu_memory_gb']:.1f} GB, {m['gpu_free_gb']:.1f} GB free")]
    if "h2d_pinned_gb_s" in m:
        rows.append(("host to GPU", f"{m['h2d_pinned_gb_s']:.1f} GB/s pinned, {m['h2d_pageable_gb_s']:.1f} GB/s pageable"))
    if "disk_read_gb_s" in m:
        rows.append(("weights read", f"{m['disk_read_gb_s']:.2f} GB/s from {m['weights_folder']}"
                     + ("" if m.get("disk_read_cold") else " (may include cached pages)")))
    tg, dr = data.get("target", {}), data.get("draft", {})
    rows.append(("target", f"{tg.get('name')}: {tg.get('parameters', 0) / 1e6:.0f}M parameters, {tg.get('placement')}"))
    passes = tg.get("pass_ms", {})
    rows.append(("pass time", ", ".join(f"{n} nodes {ms:.0f} ms" for n, ms in passes.items())))
    speed = ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in dr.get("speed", {}).items()
                      if isinstance(v, (int, float)))
    rows.append(("draft", f"{dr.get('name')}: 64-node tree in {speed}"))
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
    c = Table(title="calibration (decode, Spec-Bench prompts)", title_justify="left")
    c.add_column("draft")
    for col in ("budget", "acc/pass", "tree", "pass ms", "draft ms", "other ms", "predicted tok/s"):
        c.add_column(col, justify="right")
    for r in data.get("calibration", []):
        c.add_row(r.get("draft", dr.get("name", "")), str(r["budget"]), f"{r.get('accepted_per_pass', 0):.2f}", f"{r.get('mean_tree', 0):.1f}",
                  f"{r.get('pass_ms', 0):.1f}", f"{r.get('draft_ms', 0):.1f}",
                  f"{r.get('overhead_ms', 0):.1f}", f"{r.get('tokens_per_s', 0):.2f}")
    out.print(c)
    ch = data.get("choice", {})
    pred, meas = data.get("predicted_tokens_per_s", 0), data.get("measured_tokens_per_s", 0)
    gap = (meas - pred) / pred * 100 if pred else 0
    out.print(f"[bold]choice:[/] {ch.get('target')} + {ch.get('draft')}, {ch.get('quant')}-bit "
              f"({tg.get('quant_reason', '')}), offload {ch.get('offload')}, drafter "
              f"{ch.get('drafter')}, budget {ch.get('budget')}, overlap "
              f"{'on' if ch.get('overlap') else 'off'}", soft_wrap=True)
    if dr.get("placement_reason"):
        out.print(f"[dim]drafter: {dr['placement_reason']}[/]", soft_wrap=True)
    out.print(f"[bold]predicted[/] {pred:.2f} tok/s, [bold]measured[/] {meas:.2f} tok/s on other "
              f"prompts ({gap:+.0f} %, {data.get('measured_accepted_per_pass', 0):.2f} accepted/pass)",
              soft_wrap=True)


@app.command()
def models() -> None:
    """The presets, where each one's weights are looked for, and whether they are present."""
    from specexec_app.loading.sources import SHIPPED_DRAFTS, locate
    from specexec_app.config.presets import PRESETS_FILE, load_presets
    from specexec_app.loading.session import SELF_DRAFTS

    out = Console(highlight=False)
    with friendly_errors():
        out.print(f"[dim]presets from {PRESETS_FILE}[/]")
        for p in load_presets().values():
            where, ok = locate(p.target)
            if p.draft == "ngram":
                dwhere, dok = "no weights", True
            elif p.draft in SELF_DRAFTS:
                dwhere, dok = "made from the target", True
            else:
                dwhere, dok = locate(p.draft)
            mark = "[green]present[/]" if ok and dok else "[yellow]missing[/]"
            out.print(f"\n[bold]{p.name}[/]  {mark}  budget {p.budget}  [dim]{p.description}[/]", soft_wrap=True)
            out.print(f"  target {p.target}: {'' if ok else '[yellow]not found[/], looked in '}{where}", soft_wrap=True)
            out.print(f"  draft  {p.draft}: {'' if dok else '[yellow]not found[/], looked in '}{dwhere}", soft_wrap=True)
        for name in SHIPPED_DRAFTS:
            where, ok = locate(name)
            mark = "[green]present[/]" if ok else "[yellow]missing[/]"
            out.print(f"\n[bold]{name}[/]  {mark}  [dim]distilled draft shipped with specexec-app "
                      f"(--draft {name})[/]\n  {where}", soft_wrap=True)
        out.print("\n[dim]Any local folder, .gguf file or repo id in the local Hugging Face cache also "
                  "works as --target / --draft. Nothing is downloaded.[/]", soft_wrap=True)


@app.command("bench")
def bench_cmd(
    out: Annotated[Path, typer.Option(help="Folder for results.json, results.md and the plots.")] = Path("bench-out"),
    quick: Annotated[bool, typer.Option(help="3 prompts, 2 budgets, 2 chain lengths, 24 tokens: about two minutes on a CPU.")] = False,
    budgets: Annotated[Optional[str], typer.Option(show_default=False, help="Comma-separated SpecExec budgets. Default: 4,16 quick; 64..2048 on a GPU; 2..32 on a CPU.")] = None,
    chains: Annotated[Optional[str], typer.Option(show_default=False, help="Comma-separated chain lengths for classic speculative decoding. Default: 2,4 quick; 2,4,8.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt (quick: 24).")] = 64,
    per_category: Annotated[int, typer.Option(help="Prompts per Spec-Bench category.")] = 1,
    greedy_only: Annotated[bool, typer.Option(help="Skip the sampled runs (temperature 0.6, top-p 0.9).")] = False,
    target: Target = None,
    draft: Draft = None,
    device: Device = "auto",
    offload: Offload = None,
    quant: Quant = None,
    gpu_memory: GpuMemory = None,
    drafter: DrafterDev = None,
    trust_remote_code: TrustRemote = False,
) -> None:
    """SpecExec against transformers generate, our target alone, and classic speculative decoding,
    on Spec-Bench prompts in one process: JSON, a Markdown table and plots in --out."""
    from specexec_app.tools.bench import bench

    console = Console(highlight=False)
    with friendly_errors():
        ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
        try:
            b = ints(budgets) if budgets else None
            c = ints(chains) if chains else ([2, 4] if quick else [2, 4, 8])
        except ValueError:
            raise UserError("--budgets and --chains take comma-separated whole numbers") from None
        if min((b or [1]) + c) < 1 or b == []:
            raise UserError("budgets and chain lengths must be at least 1")
        from specexec_app.loading.session import pick_device

        gpu = pick_device(device).type == "cuda"
        b = b or ([4, 16] if quick else [64, 256, 1024, 2048] if gpu else [2, 8, 32])
        # The target is placed with room for the largest tree.
        pipe, _, _ = load_pipeline(target, draft, max(b), quant, offload, gpu_memory, drafter,
                                   device, trust_remote_code, console=err, use_profile=False)
        with err.status("benchmarking...", spinner="dots") as status:
            result = bench(pipe, out, quick, b, c, 24 if quick else max_new_tokens,
                           1 if quick else per_category, ["greedy"] if greedy_only else ["greedy", "t0.6"],
                           say=lambda msg: status.update(msg + "..."))
        console.print((out / "results.md").read_text(), markup=False)
        console.print("wrote " + ", ".join(str(f) for f in result["files"]), soft_wrap=True)
        for note in result["notes"]:
            err.print(f"note: {note}", soft_wrap=True)


@app.command()
def distill(
    out: Annotated[Path, typer.Option(help="Folder for the draft (then used as --draft OUT); its .distill/ subfolder holds the data and checkpoints a rerun resumes from.")],
    target: Annotated[str, typer.Option("--target", "-t", help="The target to distill (as for run).")] = "default",
    layers: Annotated[int, typer.Option(help="Decoder layers of the draft (of the target's width; it shares the target's embedding and head).")] = 2,
    steps: Annotated[int, typer.Option(help="Optimizer steps in all; rerun with more to train on.")] = 400,
    batch: Annotated[int, typer.Option(help="Target answers per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 5e-4,
    mode: Annotated[str, typer.Option(help="greedy: target answers greedy, forward KL; sampling: answers sampled at --temperature, TVD at it.")] = "greedy",
    temperature: Annotated[float, typer.Option(help="Sampling mode: the temperature of the data and the loss; the report's acceptance is at it.")] = 0.6,
    max_new_tokens: Annotated[int, typer.Option(help="Length of each target answer.")] = 96,
    prompts: Annotated[Optional[Path], typer.Option(show_default=False, help="Prompt file: one per line, or JSON lines with 'prompt' or 'turns' (last tenth held out). Default: Spec-Bench, its first --heldout prompts per category held out.")] = None,
    max_prompts: Annotated[Optional[int], typer.Option(show_default=False, help="Use at most this many training prompts. Default: all.")] = None,
    heldout: Annotated[int, typer.Option(help="Spec-Bench prompts per category held out for the report.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed for data order, sampling and initialization.")] = 0,
    fresh: Annotated[bool, typer.Option(help="Forget the data and checkpoint in OUT and start over.")] = False,
    device: Device = "auto",
    offload: Offload = None,
    quant: Quant = None,
    gpu_memory: GpuMemory = None,
    trust_remote_code: TrustRemote = False,
) -> None:
    """Train a small draft for a target on the target's own answers (knowledge distillation),
    with a report of its agreement with the target on held-out prompts."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from specexec_app.tools.distill import DistillSettings, Finished, Note
    from specexec_app.tools.distill import Progress as Step
    from specexec_app.tools.distill import distill as run_distill

    console = Console(highlight=False)
    with friendly_errors():
        settings = DistillSettings(layers=layers, steps=steps, batch=batch, lr=lr, mode=mode,
                                   temperature=temperature, max_new_tokens=max_new_tokens,
                                   prompts=max_prompts, heldout=heldout, seed=seed)
        pipe, _, _ = load_pipeline(target, "ngram", None, quant, offload, gpu_memory, None,
                                   device, trust_remote_code, console=err, use_profile=False)
        bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                       TimeRemainingColumn(), console=err)
        tasks: dict[str, int] = {}
        finished = None
        with bar:
            for event in run_distill(pipe.target.model, pipe.tokenizer, pipe.stop_ids,
                                     pipe.target_name, out, settings, prompts, fresh):
                if isinstance(event, Step):
                    if event.stage not in tasks:
                        tasks[event.stage] = bar.add_task(event.stage, total=event.total, info="")
                    info = f"loss {event.loss:.3f}" if event.loss is not None else ""
                    bar.update(tasks[event.stage], completed=event.done, total=event.total, info=info)
                elif isinstance(event, Note):
                    bar.console.print(event.message, soft_wrap=True)
                elif isinstance(event, Finished):
                    finished = event
        r = finished.report
        console.print(f"draft: {r['layers']} layers, {r['steps']} steps on {r['train_answer_tokens']} "
                      f"answer tokens ({r['loss']}); held-out agreement with the target over "
                      f"{r['after']['positions']} positions:", soft_wrap=True)
        for key in r["after"]:
            if key != "positions":
                console.print(f"  {key:<18} {r['before'][key]:6.1%} before  ->  {r['after'][key]:6.1%} after")
        console.print(f"wrote {finished.out} (use it: specexec run --target {target} --draft "
                      f"{finished.out})", soft_wrap=True)


@app.command()
def quantize(
    out: Annotated[Path, typer.Option(help="Folder for the packed checkpoint (then used as --target OUT).")],
    target: Annotated[str, typer.Option("--target", "-t", help="The target to pack: a preset or a safetensors folder.")] = "default",
    quant: Annotated[int, typer.Option(help="8 (int8, a scale per row) or 4 (NF4).")] = 4,
    dtype: Annotated[str, typer.Option(help="Dtype the weights decode to: bfloat16 or float16 (GPU), float32 (CPU).")] = "bfloat16",
    trust_remote_code: TrustRemote = False,
) -> None:
    """Save a target pre-quantized, as the packed layers the streamer moves: it then loads with no
    quantizing and no full-precision copy in RAM (`specexec run --target OUT`)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from offload.packed import save_packed
    from specexec_app.loading.sources import resolve
    from specexec_app.loading.checkpoint import check_checkpoint
    from specexec_app.config.presets import get_preset

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    with friendly_errors():
        if dtype not in dtypes:
            raise UserError(f"--dtype must be bfloat16, float16 or float32 (got {dtype})")
        preset = get_preset(target)
        src = resolve(preset.target if preset else target)
        if src.gguf_file:
            raise UserError(f"{target} is a GGUF file; quantize a safetensors folder")
        check_checkpoint(Path(src.path))
        with Progress(TextColumn("packing layers"), BarColumn(), MofNCompleteColumn(),
                      console=err) as bar:
            task = bar.add_task("layers", total=None)
            save_packed(Path(src.path), out, quant, dtypes[dtype],
                        progress=lambda done, total: bar.update(task, completed=done, total=total),
                        trust_remote_code=trust_remote_code)
        Console(highlight=False).print(f"wrote {out} ({quant}-bit, decodes to {dtype}); use it: "
                                       f"specexec run --target {out}", soft_wrap=True)


# ---- serve (issue 21): options copied from `chat` for now, to merge into the shared options ----
@app.command()
def serve(
    target: Target = None,
    draft: Draft = None,
    budget: Budget = None,
    temperature: Annotated[float, typer.Option(help="Default for requests that name none; 0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Default nucleus mass for requests that name none, in (0, 1].")] = 1.0,
    max_new_tokens: Annotated[Optional[int], typer.Option(show_default=False, help="Default for requests that name no max_tokens. Default: until the context is full.")] = None,
    seed: Seed = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network (there is no authentication).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one, shown at start).")] = 8000,
    queue: Annotated[int, typer.Option(help="Requests that may wait while one generates; one more gets a 429.")] = 8,
    name: Annotated[Optional[str], typer.Option(show_default=False, help="Model id the API shows. Default: the target's name.")] = None,
    device: Device = "auto",
    offload: Offload = None,
    quant: Quant = None,
    gpu_memory: GpuMemory = None,
    drafter: DrafterDev = None,
    overlap: Overlap = None,
    context: ContextSize = None,
    trust_remote_code: TrustRemote = False,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health); one request generates at a time, the others wait in order."""
    from specexec_app.config.settings import DecodeSettings
    from specexec_app.ui import serve as server

    with friendly_errors():
        if not 0 <= port < 65536:
            raise UserError(f"--port must be in 0..65535 (got {port}; 0 picks a free one)")
        settings = DecodeSettings(budget=budget if budget is not None else 1, temperature=temperature,
                                  top_p=top_p, seed=seed, max_new_tokens=max_new_tokens
                                  if max_new_tokens is not None else 1)

        def load():
            pipe, opts, _ = load_pipeline(target, draft, budget, quant, offload, gpu_memory,
                                          drafter, device, trust_remote_code, overlap=overlap,
                                          context=context)
            settings.budget, settings.overlap = pipe.default_budget, opts.overlap
            settings.max_new_tokens = max_new_tokens or pipe.target.context_length
            return pipe, settings

        server.serve(load, host, port, queue, name,
                     log=lambda line: err.print(escape(line), soft_wrap=True))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
