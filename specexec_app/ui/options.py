"""The command-line options that several commands share, declared once.

`with_options(model_options, decode_options)` adds the parameters of those template functions to
a command; the command receives their values as one dict `opts` (None where an option was not
given, so that the profile and presets can fill it: `config.settings.resolve`)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

TargetOpt = Annotated[Optional[str], typer.Option("--target", "-t", show_default=False, help="Preset name (specexec models), model folder, .gguf file, or repo id in the local HF cache. Default: the profile's target, else 'default'.")]
DraftOpt = Annotated[Optional[str], typer.Option("--draft", "-d", show_default=False, help="'ngram', 'none' (the target alone, one token a pass), 'self-int8', 'self-nf4', 'smollm2-distilled', a preset (its draft), a folder from `specexec distill`, or a draft model named like --target. Default: the profile's, else the preset's, else ngram.")]
DeviceOpt = Annotated[Optional[str], typer.Option(show_default=False, help="auto, cpu, cuda or cuda:N. Default: auto (a CUDA GPU if there is one).")]
OffloadOpt = Annotated[Optional[str], typer.Option(show_default=False, help="auto: stream the target's layers only if it does not fit the GPU, from RAM, or from disk if RAM is short too; always: stream from RAM (even on CPU); disk: stream from disk (16-bit safetensors, or a folder from `specexec quantize`); never. Default: the profile's, else auto.")]
QuantOpt = Annotated[Optional[int], typer.Option(show_default=False, help="Target weights: 16, 8 (int8) or 4 (NF4) bits. Default: the profile's, else as the checkpoint stores them (a GGUF's own blocks, which a CPU computes from directly; --quant 16 expands them at load).")]
GpuMemoryOpt = Annotated[Optional[str], typer.Option(show_default=False, help="GPU memory the target may use, e.g. 24GiB. Default: the profile's, else what is free.")]
DrafterOpt = Annotated[Optional[str], typer.Option("--drafter", show_default=False, help="Where a draft model runs: auto (with the target), gpu or cpu. Default: the profile's, else auto.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", show_default=False, help="CPU threads for the model's math (torch intra-op). Default: the profile's (it times the choices), else torch's (the physical cores).")]
ContextOpt = Annotated[Optional[int], typer.Option("--context", "-c", show_default=False, help="Most tokens a conversation holds (prompt and replies); memory for the KV cache is kept for this many. Default: 8192, or the model's limit if lower.")]
TrustRemoteOpt = Annotated[bool, typer.Option(help="Allow model code from the checkpoint (off unless asked).")]
BudgetOpt = Annotated[Optional[int], typer.Option(show_default=False, help="Draft tree nodes verified per target pass (1..16384). Default: the profile's, else the preset's.")]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy (exactly the target's greedy output); at most 100.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")]
MaxNewOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", show_default=False, help="Most tokens to generate per reply. Default: 256 (run), 512 (chat).")]
SeedOpt = Annotated[Optional[int], typer.Option(show_default=False, help="Seed for sampling (0 .. 2^63-1); the same seed repeats the output. Default: none.")]
OverlapOpt = Annotated[Optional[bool], typer.Option("--overlap/--no-overlap", show_default=False, help="Draft the next tree on a thread while the target verifies this one (pays when a pass is slow: an offloaded target). Default: the profile's, else off.")]
SystemOpt = Annotated[Optional[str], typer.Option(show_default=False, help="System prompt. Default: the chat template's own.")]
OutFolder = Annotated[Path, typer.Option(help="Output folder.")]


def model_options(target: TargetOpt = None, draft: DraftOpt = None, device: DeviceOpt = None,
                  offload: OffloadOpt = None, quant: QuantOpt = None,
                  gpu_memory: GpuMemoryOpt = None, drafter: DrafterOpt = None,
                  context: ContextOpt = None, threads: ThreadsOpt = None,
                  trust_remote_code: TrustRemoteOpt = False) -> None:
    """What to load and where (template: its parameters become options)."""


def decode_options(budget: BudgetOpt = None, temperature: TemperatureOpt = 0.0,
                   top_p: TopPOpt = 1.0, max_new_tokens: MaxNewOpt = None,
                   seed: SeedOpt = None, overlap: OverlapOpt = None) -> None:
    """How to decode (template: its parameters become options)."""


def with_options(*groups):
    """Give a command the options of the template functions `groups`, passed to it as `opts`."""
    extra = [p for g in groups for p in inspect.signature(g, eval_str=True).parameters.values()]
    names = {p.name for p in extra}

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values()
               if p.name != "opts"]

        @functools.wraps(fn)
        def command(**kwargs):
            opts = {k: kwargs.pop(k) for k in names}
            return fn(**kwargs, opts=opts)

        command.__signature__ = inspect.Signature(own + extra)
        return command
    return decorate
