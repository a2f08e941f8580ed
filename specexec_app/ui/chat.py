"""`specexec chat`: a multi-turn conversation in the terminal. This module and cli.py print."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from specexec_app.core.engine import Done, Notice, Stats, Text
from specexec_app.errors import UserError
from specexec_app.loading.session import Pipeline
from specexec_app.config.settings import DecodeSettings

PROMPT = ">>> "
MORE = "... "
MIN_REPLY_ROOM = 64  # tokens a reply needs at least before we call the context full

HELP = """\
Type a message and press Enter. Commands:
  /help                      this help
  /set budget N              draft tree nodes verified per target pass
  /set temperature T         0 = greedy
  /set top_p P               nucleus mass in (0, 1]
  /set max_tokens N          longest reply
  /set seed N|none           repeatable sampling
  /set system TEXT|none      system prompt (starts a new conversation)
  /set footer on|off         stats line after each reply
  /set overlap on|off        draft the next tree while the target verifies
  /show                      settings, models, placement
  /stats                     last reply and session: tokens/s, accepted/pass, pass, draft, GB/s
  /clear                     new conversation
  /save FILE, /load FILE     the conversation as JSON
  /exit                      leave (also Ctrl+D; Ctrl+C stops a reply)
\"\"\" on a line of its own starts and ends a multi-line message."""


@dataclass
class Conversation:
    system: str | None = None
    turns: list[dict] = field(default_factory=list)  # {"role": "user"|"assistant", "content": str}

    def messages(self, new_user: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += self.turns
        if new_user is not None:
            msgs.append({"role": "user", "content": new_user})
        return msgs

    def save(self, path: Path, extra: dict) -> None:
        try:
            path.write_text(json.dumps(extra | {"messages": self.messages()}, indent=2,
                                       ensure_ascii=False) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from e

    @classmethod
    def load(cls, path: Path) -> Conversation:
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from e
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not JSON: {e}") from e
        msgs = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(msgs, list):
            raise UserError(f"{path} has no list of messages")
        conv = cls()
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise UserError(f"{path}: message {i} needs a role (system/user/assistant) "
                                "and a text content")
            if m["role"] == "system":
                conv.system = m["content"]
            else:
                conv.turns.append({"role": m["role"], "content": m["content"]})
        return conv


def total(stats: list[Stats]) -> Stats:
    """The session's sum of every count and time (the stop reason is the last reply's)."""
    out = Stats()
    for s in stats:
        for f in fields(Stats):
            value = getattr(s, f.name)
            setattr(out, f.name, value if isinstance(value, str) else getattr(out, f.name) + value)
    return out


def stats_line(s: Stats) -> str:
    line = (f"{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, {s.accepted_per_pass:.2f} "
            f"accepted/pass, {s.pass_s * 1000:.0f} ms/pass, draft {s.draft_s:.2f} s")
    if s.streamed_bytes:
        line += f", {s.streamed_gb_per_s:.1f} GB/s streamed"
    return line


class ChatREPL:
    """The loop: read a line, run a command or a turn, print. `read` is `input` by default."""

    def __init__(self, pipe: Pipeline, settings: DecodeSettings, console: Console,
                 system: str | None = None, footer: bool = True, placement: str = "",
                 read: Callable[[str], str] = input):
        self.pipe, self.settings, self.console = pipe, settings, console
        self.conv = Conversation(system=system)
        self.footer, self.placement, self.read = footer, placement, read
        self.history: list[Stats] = []

    # ---- input -------------------------------------------------------------------------
    def read_message(self) -> str | None:
        """One message or command; None at end of input."""
        try:
            line = self.read(PROMPT)
        except EOFError:
            return None
        if line.strip().startswith('"""'):
            first = line.strip()[3:]
            if first.endswith('"""') and first:
                return first[:-3]
            lines = [first] if first else []
            while True:
                try:
                    more = self.read(MORE)
                except EOFError:
                    return None
                if more.rstrip().endswith('"""'):
                    lines.append(more.rstrip()[:-3])
                    return "\n".join(lines).strip("\n")
                lines.append(more)
        return line

    def ask(self, question: str) -> bool:
        try:
            answer = self.read(f"{question} [Y/n] ")
        except EOFError:
            return False
        return answer.strip().lower() in ("", "y", "yes")

    # ---- the loop ----------------------------------------------------------------------
    def loop(self) -> None:
        while True:
            try:
                line = self.read_message()
            except KeyboardInterrupt:  # Ctrl+C at the prompt leaves, as Ctrl+D does
                self.console.print()
                return
            if line is None:
                self.console.print()
                return
            text = line.strip()
            if not text:
                continue
            try:
                if text.startswith("/"):
                    if self.command(text) == "exit":
                        return
                else:
                    self.turn(line)
            except UserError as e:
                self.console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            except KeyboardInterrupt:
                self.console.print("[dim]interrupted[/]")
            except Exception as e:  # noqa: BLE001 - a failed turn must not end the conversation
                first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
                self.console.print(f"[bold red]error:[/] {escape(first)} (the conversation goes on)",
                                   soft_wrap=True)

    # ---- a turn ------------------------------------------------------------------------
    def fit_context(self, message: str) -> list[int] | None:
        """Token ids of the conversation plus `message`, dropping the oldest turns if the user
        agrees when it does not leave room for a reply; None if the turn is called off."""
        context, more = self.pipe.target.context_length, self.pipe.target.context_hint()
        room = min(MIN_REPLY_ROOM, self.settings.max_new_tokens)
        ids = self.pipe.encode_chat(self.conv.messages(message))
        if len(ids) + room <= context:
            return ids
        alone = self.pipe.encode_chat(Conversation(self.conv.system).messages(message))
        if len(alone) + room > context:
            raise UserError(f"this message takes {len(alone)} tokens; with room for a reply it "
                            f"does not fit the context of {context} tokens{more}")
        self.console.print(f"The context is full: the conversation and this message take "
                           f"{len(ids)} of {context} tokens{more}.", soft_wrap=True)
        if not self.ask("Drop the oldest turns to make room?"):
            self.console.print("[dim]Nothing sent. /clear starts a new conversation.[/]")
            return None
        dropped = 0
        while len(ids) + room > context and self.conv.turns:
            # Drop the oldest exchange: a user turn and the replies up to the next user turn.
            cut = 1
            while cut < len(self.conv.turns) and self.conv.turns[cut]["role"] != "user":
                cut += 1
            del self.conv.turns[:cut]
            dropped += cut
            ids = self.pipe.encode_chat(self.conv.messages(message))
        self.console.print(f"[dim]Dropped the {dropped} oldest messages.[/]")
        return ids

    def turn(self, message: str) -> None:
        ids = self.fit_context(message)
        if ids is None:
            return
        self.conv.turns.append({"role": "user", "content": message})
        reply, done, interrupted = "", None, False
        status = self.console.status("[dim]thinking...[/]", spinner="dots")
        try:
            status.start()
            for event in self.pipe.generate(ids, self.settings):
                if isinstance(event, Text) and event.text:
                    if not reply:
                        status.stop()
                    reply += event.text
                    self.console.out(event.text, end="", highlight=False)
                    self.console.file.flush()
                elif isinstance(event, Notice):
                    status.stop()
                    self.console.print(f"\n[yellow]note:[/] {event.message}", soft_wrap=True)
                elif isinstance(event, Done):
                    done = event
        except KeyboardInterrupt:
            interrupted = True
        except Exception:
            # A failed turn is not part of the conversation; the conversation goes on without it.
            self.conv.turns.pop()
            raise
        finally:
            status.stop()
        if reply or (done is not None and not interrupted):
            self.conv.turns.append({"role": "assistant", "content": reply})
        else:
            self.conv.turns.pop()  # stopped before anything was said: the message is not kept
        self.console.print()
        if interrupted:
            self.console.print("[dim]stopped; what was said is kept[/]" if reply else
                               "[dim]stopped before the reply began; the message was not kept[/]")
            return
        self.history.append(done.stats)
        if done.stats.stop_reason == "context":
            self.console.print("[yellow]The reply filled the model's context.[/] The next message "
                               "will offer to drop the oldest turns; /clear starts afresh.",
                               soft_wrap=True)
        elif done.stats.stop_reason == "length":
            self.console.print(f"[dim](stopped at {self.settings.max_new_tokens} tokens; "
                               "/set max_tokens N for longer replies)[/]")
        if self.footer:
            self.console.print(f"[dim]{stats_line(done.stats)}[/]", soft_wrap=True)

    # ---- commands ----------------------------------------------------------------------
    def command(self, text: str) -> str | None:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        handler = {"/help": self.cmd_help, "/?": self.cmd_help, "/set": self.cmd_set,
                   "/show": self.cmd_show, "/stats": self.cmd_stats, "/clear": self.cmd_clear,
                   "/save": self.cmd_save, "/load": self.cmd_load}.get(name.lower())
        if name.lower() in ("/exit", "/quit", "/bye"):
            return "exit"
        if handler is None:
            raise UserError(f"unknown command {name}; /help lists them")
        handler(arg)
        return None

    def cmd_help(self, _: str) -> None:
        self.console.print(HELP, markup=False, highlight=False)

    def cmd_set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        key, value = key.lower().replace("-", "_"), value.strip()
        if not key or not value:
            raise UserError("usage: /set budget|temperature|top_p|max_tokens|seed|system|footer VALUE")
        if key == "system":
            self.conv = Conversation(system=None if value.lower() == "none" else value)
            self.console.print("[dim]System prompt set; new conversation.[/]")
            return
        if key == "overlap":
            if value.lower() not in ("on", "off"):
                raise UserError("usage: /set overlap on|off")
            self.settings = replace(self.settings, overlap=value.lower() == "on")
            self.console.print(f"[dim]overlap = {value.lower()}[/]")
            return
        if key == "footer":
            if value.lower() not in ("on", "off"):
                raise UserError("usage: /set footer on|off")
            self.footer = value.lower() == "on"
            return
        fields = {"budget": ("budget", int), "temperature": ("temperature", float),
                  "top_p": ("top_p", float), "max_tokens": ("max_new_tokens", int),
                  "max_new_tokens": ("max_new_tokens", int), "seed": ("seed", int)}
        if key not in fields:
            raise UserError(f"cannot set {key}; settable: budget, temperature, top_p, "
                            "max_tokens, seed, system, footer, overlap")
        attr, kind = fields[key]
        if key == "seed" and value.lower() == "none":
            parsed = None
        else:
            try:
                parsed = kind(value)
            except ValueError:
                raise UserError(f"{key} takes a number (got {value!r})") from None
        self.settings = replace(self.settings, **{attr: parsed})  # validates
        self.console.print(f"[dim]{key} = {parsed}[/]")
        planned = self.pipe.target.placement
        if key == "budget" and planned and planned.work_bytes and parsed > planned.tree_budget:
            self.console.print(f"[dim]The target was placed with memory for {planned.tree_budget}-"
                               "node trees; a larger tree may not fit (the budget then shrinks "
                               "and says so). Start with --budget to place it for more.[/]")

    def cmd_show(self, _: str) -> None:
        s, pipe = self.settings, self.pipe
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        rows = [("target", pipe.target_name), ("draft", pipe.draft_name),
                ("placement", self.placement or f"resident on {pipe.target.device}"),
                ("context", f"{pipe.target.context_length} tokens"),
                ("budget", str(s.budget)), ("temperature", str(s.temperature)),
                ("top_p", str(s.top_p)), ("max_tokens", str(s.max_new_tokens)),
                ("seed", str(s.seed)), ("overlap", "on" if s.overlap else "off"), ("system", self.conv.system or "(the template's default)"),
                ("footer", "on" if self.footer else "off"),
                ("conversation", f"{len(self.conv.turns)} messages")]
        for k, v in rows:
            table.add_row(k, v)
        self.console.print(table)

    def cmd_stats(self, _: str) -> None:
        if not self.history:
            self.console.print("No replies yet.")
            return
        last = self.history[-1]
        self.console.print(f"last reply: {stats_line(last)}, target {last.target_s:.2f} s, "
                           f"{last.target_passes} passes, stop: {last.stop_reason}", soft_wrap=True)
        all_ = total(self.history)
        self.console.print(f"session ({len(self.history)} replies): {stats_line(all_)}, "
                           f"target {all_.target_s:.2f} s, {all_.target_passes} passes",
                           soft_wrap=True)

    def cmd_clear(self, _: str) -> None:
        self.conv = Conversation(system=self.conv.system)
        self.console.print("[dim]New conversation.[/]")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise UserError("usage: /save FILE")
        path = Path(os.path.expanduser(arg))
        self.conv.save(path, {"target": self.pipe.target_name, "draft": self.pipe.draft_name,
                              "settings": vars(self.settings)})
        self.console.print(f"[dim]Saved {len(self.conv.turns)} messages to {path}.[/]")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise UserError("usage: /load FILE")
        path = Path(os.path.expanduser(arg))
        self.conv = Conversation.load(path)
        self.console.print(f"[dim]Loaded {len(self.conv.turns)} messages from {path}.[/]")
        if self.conv.turns:
            last = self.conv.turns[-1]
            self.console.print(f"[dim]last ({last['role']}):[/] {escape(last['content'][:200])}",
                               soft_wrap=True, highlight=False)


def enable_history(path: Path) -> None:
    """Arrow keys and a persistent history through readline, where the platform has it."""
    try:
        import readline
    except ImportError:
        return
    import atexit

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: _write_history(readline, path))


def _write_history(readline, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass
