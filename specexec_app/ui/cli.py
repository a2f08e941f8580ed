"""The `specexec` command. Only the ui package prints: the reply on stdout, the rest on stderr."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from specexec_app import __version__
from specexec_app.errors import UserError

from .options import DraftOpt, SystemOpt, TargetOpt, TrustRemoteOpt, decode_options, model_options, with_options

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Exact SpecExec speculative decoding: chat with a big model on a small machine.")
err = Console(stderr=True, highlight=False)
PROFILE_TIP = "tip: `specexec profile` tunes the budget and placement to this machine"


def _version(value: bool) -> None:
    if value:
        print(f"specexec {__version__}")
        raise typer.Exit()


@app.callback()
def _group(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = False) -> None:
    """Exact SpecExec speculative decoding: chat with a big model on a small machine."""


def error_line(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


@contextmanager
def friendly_errors():
    """Bad input and known failures end in one line on stderr and a non-zero exit."""
    try:
        yield
    except UserError as e:
        error_line(str(e))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("\ninterrupted")
        raise typer.Exit(130) from None
    except MemoryError as e:
        error_line(f"out of memory: {e}")
        raise typer.Exit(1) from None


def resolve_config(opts: dict, use_profile: bool = True, **defaults):
    """Command-line values, the saved profile and presets -> a checked `RunConfig`."""
    from specexec_app.config.profile import load_profile
    from specexec_app.config.settings import resolve

    profile = load_profile() if use_profile else None
    given = dict(opts) | {k: v for k, v in defaults.items() if opts.get(k) is None}
    return resolve(given, profile.choice if profile else None), profile


class _Quiet:
    """A spinner's stand-in where the console is no terminal (a log file must not get the blank
    lines a spinner leaves behind)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def update(self, *_) -> None: ...
    def __enter__(self): return self
    def __exit__(self, *_) -> None: ...


def load(config, console: Console = err):
    """Build the pipeline with a spinner, and a bar while layers are placed (on a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from specexec_app.loading.session import build
    from specexec_app.ui.terminal import keys_held

    live = console.is_terminal
    bar = Progress(TextColumn("placing layers"), BarColumn(), MofNCompleteColumn(),
                   console=console, transient=True, disable=not live)
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

    with keys_held(), console.status("loading models...", spinner="dots") if live else _Quiet() \
            as status:
        try:
            pipe = build(config.load, status=lambda msg: status.update(escape(msg) + "..."),
                         progress=progress)
        finally:
            bar.stop()
    asked, most = config.load.context, pipe.target.max_context
    if asked and asked > most:
        console.print(f"note: --context {asked} is beyond what {pipe.target_name} attends over; "
                      f"using {most} tokens", soft_wrap=True, markup=False)
    return pipe


def read_prompt(prompt: str) -> str:
    """The prompt as given, or stdin's for '-' (without the newline that ends a file or an
    `echo`): text that is valid UTF-8 and not empty."""
    try:
        text = sys.stdin.buffer.read().decode("utf-8").rstrip("\r\n") if prompt == "-" else prompt
        text.encode("utf-8")  # an argument with bytes that are not UTF-8 holds lone surrogates
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise UserError("the prompt is not valid UTF-8 text") from None
    if not text.strip():
        raise UserError("the prompt is empty")
    return text


def write_out(text: str) -> None:
    """Reply text to stdout, now; a closed or full stdout is a one-line error."""
    try:
        if sys.stdout is None:
            raise BrokenPipeError(9, "stdout is closed")
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as e:
        # Later flushes (at exit) would fail again: send what is left nowhere.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        raise UserError(f"cannot write the reply to stdout: "
                        f"{getattr(e, 'strerror', None) or e}") from None


def stream_reply(events, passes) -> object:
    """Print a reply as it is accepted (notes to stderr); returns the Done event. Each pass is
    added to the Stats `passes` as it comes (a reply stopped by Ctrl+C has no Done)."""
    from specexec_app.core.engine import Done, Notice, Pass, Text

    done = None
    try:
        for event in events:
            if isinstance(event, Pass):
                passes.add(event)
            elif isinstance(event, Text) and event.text:
                write_out(event.text)
            elif isinstance(event, Notice):
                err.print(f"note: {event.message}", soft_wrap=True, markup=False)
            elif isinstance(event, Done):
                done = event
    except KeyboardInterrupt:
        write_out("\n")
        raise
    return done


@app.command()
@with_options(model_options, decode_options)
def run(prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from stdin.")],
        raw: Annotated[bool, typer.Option(help="No chat template: continue PROMPT as plain text.")] = False,
        system: SystemOpt = None,
        stats: Annotated[bool, typer.Option(help="Print a stats line on stderr.")] = False,
        stats_json: Annotated[Optional[Path], typer.Option(show_default=False, help="Write the run's stats as JSON to this file.")] = None,
        opts: dict = None) -> None:
    """Generate one reply to PROMPT, streamed to stdout; diagnostics go to stderr."""
    from specexec_app.files import check_writable, write_atomic
    from .terminal import keys_held

    with friendly_errors(), ExitStack() as held:
        prompt = read_prompt(prompt)
        if raw and system:
            raise UserError("--system goes into the chat template, which --raw leaves out")
        if stats_json:
            if str(stats_json) == "-":
                raise UserError("--stats-json takes a file: stdout holds the reply "
                                "(/dev/stderr writes the JSON there)")
            check_writable(stats_json, "--stats-json")
        held.enter_context(keys_held())  # the prompt is read: keys typed now go to no reply
        from specexec_app.core.engine import Stats  # (imports torch: seconds)
        from .render import stats_line, what_runs

        config, profile = resolve_config(opts)
        pipe = load(config)
        if stats:  # what ran, as chat's first line says it
            err.print(what_runs(pipe, config.decode.budget, config.from_profile), soft_wrap=True,
                      markup=False)
        elif pipe.target.placement is not None:
            err.print(f"target: {pipe.placement_text()}", soft_wrap=True, markup=False)
        if profile is None and err.is_terminal:
            err.print(PROFILE_TIP, style="dim", markup=False)

        def report(s) -> None:
            s.load_s = pipe.load_s
            if stats:
                err.print(stats_line(s, load=True), soft_wrap=True, markup=False)
            if stats_json:
                data = s.to_dict() | {"target": pipe.target_name, "draft": pipe.draft_name,
                                      "budget": config.decode.budget,
                                      "temperature": config.decode.temperature}
                write_atomic(stats_json, json.dumps(data, indent=2) + "\n")

        ids = pipe.encode(prompt, raw=raw, system=system)
        partial = Stats(prompt_tokens=len(ids), reused_prompt_tokens=pipe.target.cached(ids))
        try:
            done = stream_reply(pipe.generate(ids, config.decode), partial)
        except KeyboardInterrupt:  # the stats of what was done, then exit 130
            partial.stop_reason = "interrupted"
            report(partial)
            raise
        write_out("" if raw else "\n")
        if done.stats.stop_reason == "context":
            context = pipe.target.context_length
            err.print(f"note: the reply was cut where it filled the model's context of {context} "
                      f"tokens{pipe.target.context_hint()}", soft_wrap=True, markup=False)
        elif done.stats.stop_reason == "length" and not raw and \
                config.sources.get("max_new_tokens") != "option":
            err.print(f"note: the reply stopped at {config.decode.max_new_tokens} tokens "
                      "(--max-new-tokens N for longer replies)", soft_wrap=True, markup=False)
        report(done.stats)


@app.command()
@with_options(model_options, decode_options)
def chat(system: SystemOpt = None,
         footer: Annotated[bool, typer.Option(help="A one-line stats footer after each reply.")] = True,
         history: Annotated[bool, typer.Option(help="Keep input history across sessions.")] = True,
         opts: dict = None) -> None:
    """Chat with the model in the terminal. /help lists the commands; Ctrl+C stops a reply."""
    from .terminal import keys_held

    # Ctrl+C must reach the REPL even when the shell that started us ignored SIGINT (a job started
    # in the background by a script): Python leaves an ignored SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = Console(highlight=False)
    with friendly_errors():
        with keys_held():  # from the start: importing torch takes seconds before the spinner
            from .chat import ChatREPL, history_file

            config, profile = resolve_config(opts, max_new_tokens=512)
            pipe = load(config, out)
        ChatREPL(pipe, config.decode, out, system=system, footer=footer,
                 history=history_file() if history else None, tuned=config.from_profile,
                 tip=profile is None).loop()


@app.command()
def profile(
    target: TargetOpt = None,
    draft: DraftOpt = None,
    device: Annotated[Optional[str], typer.Option(show_default=False, help="auto, cpu, cuda or cuda:N.")] = None,
    gpu_memory: Annotated[Optional[str], typer.Option(show_default=False, help="Tune for this much GPU memory (e.g. 12GiB, to stand in for a consumer GPU). Default: what is free.")] = None,
    quant: Annotated[Optional[int], typer.Option(show_default=False, help="Weights in 16, 8 or 4 bits. Default: the most precise that fits RAM.")] = None,
    quick: Annotated[bool, typer.Option(help="Fewer prompts, budgets and tokens (a rough profile in seconds).")] = False,
    show: Annotated[bool, typer.Option(help="Print the saved profile and exit.")] = False,
    reset: Annotated[bool, typer.Option(help="Forget the saved profile and exit.")] = False,
    trust_remote_code: TrustRemoteOpt = False,
) -> None:
    """Measure this machine, tune quantization, placement, drafter and budget, and save the result
    for `run` and `chat`."""
    from specexec_app.config.profile import forget_profile, load_profile, profile_path, save_profile
    from specexec_app.config.settings import resolve
    from specexec_app.tools.tune import tune

    from .render import show_profile

    out = Console(highlight=False)
    with friendly_errors():
        if reset and show:
            raise UserError("--show and --reset cannot go together: --reset forgets the profile")
        if reset:
            gone = forget_profile()
            out.print(f"Forgot {profile_path()}." if gone else "There is no saved profile.", markup=False)
            return
        if show:
            data = load_profile()
            if data is None:
                raise UserError(f"no saved profile at {profile_path()}; run `specexec profile`")
            show_profile(out, data)
            out.print(str(profile_path()), style="dim", markup=False)
            return
        config = resolve(dict(target=target, draft=draft, device=device, quant=quant,
                              gpu_memory=gpu_memory, trust_remote_code=trust_remote_code))
        with out.status("profiling...", spinner="dots") as status:
            data = tune(config.load, target or "default", gpu_memory, quant is not None,
                        draft is not None, quick,
                        say=lambda msg: status.update(escape(msg) + "..."),
                        load=lambda spec: load(type(config)(spec, config.decode), out))
        show_profile(out, data)
        path = save_profile(data)
        out.print(f"Saved to {path}; `run` and `chat` use it unless options say otherwise.",
                  markup=False)


@app.command()
def models() -> None:
    """The presets, where each one's weights are looked for, and whether they are present."""
    from specexec_app.config.presets import PRESETS_FILE, load_presets
    from specexec_app.loading.hf import WEIGHTLESS
    from specexec_app.loading.session import SELF_DRAFTS
    from specexec_app.loading.sources import SHIPPED_DRAFTS, list_ollama, locate, ollama_models

    out = Console(highlight=False)
    with friendly_errors():
        out.print(f"[dim]presets from {escape(str(PRESETS_FILE))}[/]")
        for p in load_presets().values():
            where, ok = locate(p.target)
            if p.draft in WEIGHTLESS:
                dwhere, dok = "no weights", True
            elif p.draft in SELF_DRAFTS:
                dwhere, dok = "made from the target", True
            else:
                dwhere, dok = locate(p.draft)
            mark = "[green]present[/]" if ok and dok else "[yellow]missing[/]"
            budget = f"budget {p.budget}" + (f" ({p.cpu_budget} on a CPU)" if p.cpu_budget else "")
            out.print(f"\n[bold]{escape(p.name)}[/]  {mark}  {budget}  [dim]{escape(p.description)}[/]", soft_wrap=True)
            out.print(f"  target {escape(p.target)}: {'' if ok else '[yellow]not found[/], looked in '}{escape(where)}", soft_wrap=True)
            out.print(f"  draft  {escape(p.draft)}: {'' if dok else '[yellow]not found[/], looked in '}{escape(dwhere)}", soft_wrap=True)
        for name in SHIPPED_DRAFTS:
            where, ok = locate(name)
            mark = "[green]present[/]" if ok else "[yellow]missing[/]"
            out.print(f"\n[bold]{name}[/]  {mark}  [dim]distilled draft shipped with specexec-app "
                      f"(--draft {name})[/]\n  {escape(where)}", soft_wrap=True)
        found = list_ollama()
        out.print(f"\n[bold]Ollama store[/] [dim]{escape(str(ollama_models()))}[/]"
                  + ("" if found else "  [yellow]none there[/]"), soft_wrap=True)
        for spec, blob in found:
            out.print(f"  {escape(spec)}  [dim]{escape(str(blob))}[/]", soft_wrap=True)
        out.print("\n[dim]Any local folder, .gguf file (or the first part of a split one), Ollama "
                  "name:tag, or repo id in the local Hugging Face cache also works as --target / "
                  "--draft. Nothing is downloaded.[/]", soft_wrap=True)


def _ints(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--budgets and --chains take comma-separated whole numbers (got {name} "
                        f"{text!r})") from None
    if not values or min(values) < 1:
        raise UserError(f"budgets and chain lengths must be at least 1 (got {name} {text!r})")
    return values


@app.command("bench")
@with_options(model_options)
def bench_cmd(
    out: Annotated[Path, typer.Option(help="Folder for results.json, results.md and the plots.")] = Path("bench-out"),
    quick: Annotated[bool, typer.Option(help="3 prompts, 2 budgets, 2 chain lengths, 24 tokens: about two minutes on a CPU.")] = False,
    budgets: Annotated[Optional[str], typer.Option(show_default=False, help="Comma-separated SpecExec budgets. Default: 4,16 quick; 64..2048 on a GPU; 2..32 on a CPU.")] = None,
    chains: Annotated[Optional[str], typer.Option(show_default=False, help="Comma-separated chain lengths for classic speculative decoding. Default: 2,4 quick; 2,4,8.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="New tokens per prompt (quick: 24).")] = 64,
    per_category: Annotated[int, typer.Option(min=1, help="Prompts per Spec-Bench category.")] = 1,
    greedy_only: Annotated[bool, typer.Option(help="Skip the sampled runs (temperature 0.6, top-p 0.9).")] = False,
    opts: dict = None,
) -> None:
    """SpecExec against transformers generate, our target alone, and classic speculative decoding,
    on Spec-Bench prompts in one run (an offloaded target's accelerate baseline in a process of its
    own, after ours): JSON, a Markdown table and plots in --out."""
    from specexec_app.files import check_out_folder
    from specexec_app.loading.session import pick_device
    from specexec_app.tools.bench import bench

    console = Console(highlight=False)
    with friendly_errors():
        b = _ints(budgets, "--budgets")
        c = _ints(chains, "--chains") or ([2, 4] if quick else [2, 4, 8])
        check_out_folder(out, [], force=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out {out}: {e.strerror or e}") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to --out {out}: permission denied")
        gpu = pick_device(opts.get("device") or "auto").type == "cuda"
        b = b or ([4, 16] if quick else [64, 256, 1024, 2048] if gpu else [2, 8, 32])
        # The target is placed with room for the largest tree.
        config, _ = resolve_config(opts | {"budget": max(b)}, use_profile=False)
        pipe = load(config)
        with err.status("benchmarking...", spinner="dots") as status:
            result = bench(pipe, out, quick, b, c, 24 if quick else max_new_tokens,
                           1 if quick else per_category, ["greedy"] if greedy_only else ["greedy", "t0.6"],
                           say=lambda msg: status.update(escape(msg) + "..."))
        console.print((out / "results.md").read_text(), markup=False)
        console.print("wrote " + ", ".join(str(f) for f in result["files"]), soft_wrap=True, markup=False)
        for note in result["notes"]:
            err.print(f"note: {note}", soft_wrap=True, markup=False)


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
    force: Annotated[bool, typer.Option(help="Write into an --out folder that holds another model.")] = False,
    device: Annotated[Optional[str], typer.Option(show_default=False, help="auto, cpu, cuda or cuda:N.")] = None,
    trust_remote_code: TrustRemoteOpt = False,
) -> None:
    """Train a small draft for a target on the target's own answers (knowledge distillation),
    with a report of its agreement with the target on held-out prompts."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from specexec_app.config.settings import resolve
    from specexec_app.files import check_out_folder
    from specexec_app.loading.sources import resolve as find_model
    from specexec_app.tools.distill import DistillSettings, Finished, Note, Step
    from specexec_app.tools.distill import distill as run_distill

    console = Console(highlight=False)
    with friendly_errors():
        settings = DistillSettings(layers=layers, steps=steps, batch=batch, lr=lr, mode=mode,
                                   temperature=temperature, max_new_tokens=max_new_tokens,
                                   prompts=max_prompts, heldout=heldout, seed=seed)
        # The teacher in dense weights (a GGUF expanded at load): the draft trains through its
        # head, which the CPU's packed kernels have no gradient for.
        config = resolve(dict(target=target, draft="ngram", device=device, quant=16,
                              trust_remote_code=trust_remote_code))
        check_out_folder(out, [Path(find_model(config.load.target).path)], force,
                         own="specexec_draft.json")
        pipe = load(config)
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
                    bar.console.print(event.message, soft_wrap=True, markup=False)
                elif isinstance(event, Finished):
                    finished = event
        r = finished.report
        console.print(f"draft: {r['layers']} layers, {r['steps']} steps on {r['train_answer_tokens']} "
                      f"answer tokens ({r['loss']}); held-out agreement with the target over "
                      f"{r['after']['positions']} positions:", soft_wrap=True, markup=False)
        for key in r["after"]:
            if key != "positions":
                console.print(f"  {key:<18} {r['before'][key]:6.1%} before  ->  {r['after'][key]:6.1%} after")
        console.print(f"wrote {finished.out} (use it: specexec run --target {target} --draft "
                      f"{finished.out})", soft_wrap=True, markup=False)


@app.command()
def quantize(
    out: Annotated[Path, typer.Option(help="Folder for the packed checkpoint (then used as --target OUT).")],
    target: Annotated[str, typer.Option("--target", "-t", show_default=False, help="The target to pack: a preset or a safetensors folder (a GGUF, such as the default model's, is already quantized and runs as it is).")],
    quant: Annotated[int, typer.Option(help="8 (int8, a scale per row) or 4 (NF4).")] = 4,
    dtype: Annotated[str, typer.Option(help="Dtype the weights decode to: bfloat16 or float16 (GPU), float32 (CPU).")] = "bfloat16",
    force: Annotated[bool, typer.Option(help="Replace an --out folder that already holds a model.")] = False,
    trust_remote_code: TrustRemoteOpt = False,
) -> None:
    """Save a target pre-quantized, as the packed layers the streamer moves: it then loads with no
    quantizing and no full-precision copy in RAM (`specexec run --target OUT`)."""
    import shutil

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from offload.packed import save_packed
    from specexec_app.config.presets import get_preset
    from specexec_app.files import check_out_folder, remove_orphans, replace_folder, temp_folder
    from specexec_app.loading.checkpoint import check_checkpoint
    from specexec_app.loading.sources import resolve

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    with friendly_errors():
        if dtype not in dtypes:
            raise UserError(f"--dtype must be bfloat16, float16 or float32 (got {dtype})")
        if quant not in (8, 4):
            raise UserError(f"--quant must be 8 or 4 for a packed checkpoint (got {quant})")
        preset = get_preset(target)
        src = resolve(preset.target if preset else target)
        check_out_folder(out, [Path(src.path)], force, replaces=True)
        if src.gguf_file:
            raise UserError(f"{target} is a GGUF model, already quantized: it runs as it is "
                            "(`specexec run --target ...`); quantize a safetensors folder")
        check_checkpoint(Path(src.path))
        out = out.expanduser()
        parent = out.absolute().parent
        remove_orphans(parent, ".quantize-")
        try:
            tmp = temp_folder(parent, ".quantize-")
        except OSError as e:
            raise UserError(f"cannot write to {parent}: {e.strerror or e}") from None
        try:
            with Progress(TextColumn("packing layers"), BarColumn(), MofNCompleteColumn(),
                          console=err) as bar:
                task = bar.add_task("layers", total=None)
                save_packed(Path(src.path), tmp, quant, dtypes[dtype],
                            progress=lambda done, total: bar.update(task, completed=done, total=total),
                            trust_remote_code=trust_remote_code)
            replace_folder(tmp, out)
        except OSError as e:
            raise UserError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        Console(highlight=False).print(f"wrote {out} ({quant}-bit, decodes to {dtype}); use it: "
                                       f"specexec run --target {out}", soft_wrap=True, markup=False)


@app.command()
@with_options(model_options, decode_options)
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network (there is no authentication).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one, shown at start).")] = 8000,
    queue: Annotated[int, typer.Option(help="Requests that may wait while one generates; one more gets a 429.")] = 8,
    name: Annotated[Optional[str], typer.Option(show_default=False, help="Model id the API shows. Default: the target's name.")] = None,
    opts: dict = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health); one request generates at a time, the others wait in order. The
    sampling options are the defaults of requests that name none; without --max-new-tokens a
    reply may fill the context."""
    from dataclasses import replace

    from specexec_app.ui import serve as server

    with friendly_errors():
        if not 0 <= port < 65536:
            raise UserError(f"--port must be in 0..65535 (got {port}; 0 picks a free one)")
        if not 0 <= queue <= 10_000:
            raise UserError(f"--queue must be in 0..10000 (got {queue})")
        config, _ = resolve_config(opts)

        def load_for_serving():
            pipe = load(config)
            settings = config.decode
            if opts.get("max_new_tokens") is None:
                settings = replace(settings, max_new_tokens=pipe.target.context_length)
            return pipe, settings

        server.serve(load_for_serving, host, port, queue, name,
                     log=lambda line: err.print(line, soft_wrap=True, markup=False))


def main() -> None:
    """The console script: click's own usage errors (a word where a number belongs, an unknown
    option) end like every other bad input, in one `error:` line and exit 1."""
    try:  # typer carries its own copy of click (a private module), older ones use click's
        from typer._click import exceptions as cx
    except ImportError:
        from click import exceptions as cx

    try:
        code = app(standalone_mode=False)
    except cx.NoArgsIsHelpError as e:
        print(e.format_message())
        code = 0
    except cx.UsageError as e:
        hint = f" (specexec {e.ctx.info_name} -h lists the options)" if e.ctx and e.ctx.parent else ""
        error_line(e.format_message().strip().splitlines()[-1] + hint)
        code = 1
    except typer.Abort:
        err.print("\ninterrupted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
