"""The `specexec` command. Only this module (and the REPL) prints."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Exact SpecExec speculative decoding: chat with a big model on a small machine.")
err = Console(stderr=True, highlight=False)


@app.callback()
def _group() -> None:
    """Exact SpecExec speculative decoding: chat with a big model on a small machine."""


@contextmanager
def friendly_errors():
    """Bad input and known failures end in one line on stderr and a non-zero exit."""
    try:
        yield
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
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


Target = Annotated[str, typer.Option("--target", "-t", help="Preset name (see configs/presets.toml), model folder, .gguf file, or repo id in the local HF cache.")]
Draft = Annotated[Optional[str], typer.Option("--draft", "-d", help="'ngram', 'self-int8', 'self-nf4', a preset (its draft), or a draft model like --target. Default: the preset's draft, else ngram.")]
Budget = Annotated[Optional[int], typer.Option(help="Draft tree nodes verified per target pass (>= 1). Default: the preset's.")]


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from stdin.")],
    target: Target = "default",
    draft: Draft = None,
    budget: Budget = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy (exactly the target's greedy output).")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling; the same seed repeats the output.")] = None,
    raw: Annotated[bool, typer.Option(help="No chat template: continue PROMPT as plain text.")] = False,
    system: Annotated[Optional[str], typer.Option(help="System prompt (chat mode).")] = None,
    stats: Annotated[bool, typer.Option(help="Print a stats line on stderr.")] = False,
    stats_json: Annotated[Optional[Path], typer.Option(help="Write the run's stats as JSON to this file.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    offload: Annotated[str, typer.Option(help="auto: stream the target's layers only if it does not fit the GPU; always: stream (even on CPU); never.")] = "auto",
    quant: Annotated[int, typer.Option(help="Target weights: 16, 8 (int8) or 4 (NF4) bits.")] = 16,
    gpu_memory: Annotated[Optional[str], typer.Option(help="GPU memory the target may use, e.g. 24GiB (default: what is free).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the checkpoint (off unless asked).")] = False,
) -> None:
    """Generate one reply to PROMPT, streamed to stdout; diagnostics go to stderr."""
    from .engine import Done, Notice, Text
    from .session import build
    from .settings import DecodeSettings, parse_size

    with friendly_errors():
        if prompt == "-":
            prompt = sys.stdin.read()
        if not prompt.strip():
            raise UserError("the prompt is empty")
        settings = DecodeSettings(budget=budget if budget is not None else 1, temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, seed=seed)
        with err.status("loading models...", spinner="dots") as status:
            pipe = build(target, draft, device, trust_remote_code,
                         status=lambda msg: status.update(msg + "..."), offload=offload,
                         quant=quant, gpu_memory=parse_size(gpu_memory) if gpu_memory else None)
        if pipe.target.placement is not None:
            from offload.model import describe

            err.print(f"target: {describe(pipe.target.placement)}", soft_wrap=True)
        settings.budget = budget if budget is not None else pipe.default_budget
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
