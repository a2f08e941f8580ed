"""How stats and the profile look on the terminal, for every command (plain text: callers print it
with markup off, so that no user string is read as rich markup)."""

from __future__ import annotations

from dataclasses import fields

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from specexec_app.config.profile import Profile
from specexec_app.core.engine import Stats

MEASURED_SHORT = 30  # % below the prediction past which a profile's check is suspect


def what_runs(pipe, budget: int, tuned: bool) -> str:
    """The line that names what answers: target, draft, budget and placement."""
    return (f"{pipe.target_name} with {draft_text(pipe, budget)}, {pipe.placement_text()}"
            + (" (tuned by your profile)" if tuned else ""))


def draft_text(pipe, budget: int) -> str:
    """'draft ngram, budget 3', or what `--draft none` means."""
    if pipe.draft_name == "none":
        return "no draft (one token a pass)"
    return f"draft {pipe.draft_name}, budget {budget}"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 token', '2 tokens'; '1 pass', '2 passes'."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + ('es' if noun.endswith('s') else 's')}"


def stats_line(s: Stats, load: bool = False, stop: bool = True) -> str:
    """Load, prompt and generation apart (as llama.cpp's and Ollama's footers), then the
    speculative figures: tokens accepted per target pass, pass and draft time, GB/s streamed."""
    parts = [f"load {s.load_s:.2f} s"] if load else []
    cached = f", {s.reused_prompt_tokens} cached" if s.reused_prompt_tokens else ""
    parts.append(f"prompt {count(s.prompt_tokens, 'token')}{cached}, {s.prompt_tokens_per_s:.1f} tok/s")
    parts.append(f"generation {count(s.new_tokens, 'token')}, {s.tokens_per_s:.2f} tok/s, first token "
                 f"{s.first_token_s:.2f} s")
    spec = (f"{s.accepted_per_pass:.2f} accepted/pass over {count(s.target_passes, 'pass')}, "
            f"{s.pass_s * 1000:.0f} ms/pass, draft {s.draft_s:.2f} s")
    if s.streamed_bytes:
        spec += f", streamed {s.streamed_gb_per_s:.1f} GB/s"
    parts.append(spec)
    if stop and s.stop_reason:
        parts.append(f"stop: {s.stop_reason}")
    return " | ".join(parts)


def total(stats: list[Stats]) -> Stats:
    """The session's sum of every count and time (the stop reason is the last reply's)."""
    out = Stats()
    for s in stats:
        for f in fields(Stats):
            value = getattr(s, f.name)
            setattr(out, f.name, value if isinstance(value, str) else getattr(out, f.name) + value)
    return out


def show_profile(out: Console, p: Profile) -> None:
    m = p.machine
    t = Table(title="this machine", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")  # a long path folds onto the next line, never cut
    rows = [("CPU", f"{m.cpu}: {m.cpu_cores} cores, {m.cpu_threads} threads"),
            ("RAM", f"{m.ram_total_gb:.1f} GB, {m.ram_free_gb:.1f} GB free, copies at "
                    f"{m.ram_copy_gb_s:.1f} GB/s"),
            ("GPU", m.gpu if m.gpu == "none" else
             f"{m.gpu}: {m.gpu_memory_gb:.1f} GB, {m.gpu_free_gb:.1f} GB free")]
    if m.h2d_pinned_gb_s is not None:
        rows.append(("host to GPU", f"{m.h2d_pinned_gb_s:.1f} GB/s pinned, "
                                    f"{m.h2d_pageable_gb_s or 0:.1f} GB/s pageable"))
    if m.disk_read_gb_s is not None:
        rows.append(("weights read", f"{m.disk_read_gb_s:.2f} GB/s from {m.weights_folder}"
                     + ("" if m.disk_read_cold else " (may include cached pages)")))
    rows.append(("target", f"{p.target.name}: {p.target.parameters / 1e6:.0f}M parameters, "
                           f"{p.target.placement}"))
    rows.append(("pass time", ", ".join(f"{n} nodes {ms:.0f} ms" for n, ms in p.target.pass_ms.items())))
    if p.target.threads_pass_ms:
        rows.append(("CPU threads", ", ".join(f"{n}: {ms:.0f} ms" for n, ms in p.target.threads_pass_ms.items())
                     + f" (two passes; chose {p.choice.threads})"))
    speed = ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in p.draft.speed.items()
                      if isinstance(v, (int, float)))
    rows.append(("draft", f"{p.draft.name}: 64-node tree in {speed}"))
    for k, v in rows:
        t.add_row(k, escape(v))
    out.print(t)
    c = Table(title="calibration (decode, Spec-Bench prompts)", title_justify="left")
    c.add_column("draft")
    for col in ("budget", "acc/pass", "tree", "pass ms", "draft ms", "other ms", "predicted tok/s"):
        c.add_column(col, justify="right")
    for r in p.calibration:
        c.add_row(escape(str(r.get("draft", p.draft.name))), str(r.get("budget", "")),
                  *(f"{r.get(k, 0):.{d}f}" for k, d in (
                      ("accepted_per_pass", 2), ("mean_tree", 1), ("pass_ms", 1), ("draft_ms", 1),
                      ("overhead_ms", 1), ("tokens_per_s", 2))))
    out.print(c)
    ch = p.choice
    pred, meas = p.predicted_tokens_per_s, p.measured_tokens_per_s
    gap = (meas - pred) / pred * 100 if pred else 0
    weights = f"{ch.quant}-bit" if ch.quant else "weights as stored"
    out.print(f"choice: {ch.target} + {ch.draft}, {weights} ({p.target.quant_reason}), offload "
              f"{ch.offload}, drafter {ch.drafter}, budget {ch.budget}, overlap "
              f"{'on' if ch.overlap else 'off'}", soft_wrap=True, markup=False)
    if p.draft.placement_reason:
        out.print(f"drafter: {p.draft.placement_reason}", soft_wrap=True, markup=False, style="dim")
    out.print(f"predicted {pred:.2f} tok/s, measured {meas:.2f} tok/s on other prompts "
              f"({gap:+.0f} %, {p.measured_accepted_per_pass:.2f} accepted/pass)", soft_wrap=True,
              markup=False)
    if gap < -MEASURED_SHORT:
        out.print(f"warning: the check ran {-gap:.0f} % below the prediction; something else was "
                  "likely using the machine while it ran. Run `specexec profile` again when it is "
                  "idle.", soft_wrap=True, markup=False, style="yellow")
