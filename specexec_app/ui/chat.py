"""`specexec chat`: a multi-turn conversation in the terminal, with the habits of Ollama and
llama-cli. Line editing, bracketed paste, history search and command completion come from
prompt_toolkit when the terminal is interactive; plain `input` otherwise."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text as RichText

from specexec_app.config.settings import DecodeSettings, check_threads
from specexec_app.core.engine import Done, Notice, Pass, Stats, Text
from specexec_app.errors import UserError
from specexec_app.files import write_atomic
from specexec_app.loading.session import Pipeline
from specexec_app.ui.terminal import keys_held

from .render import stats_line, total, what_runs

PROMPT = ">>> "
MORE = "... "
MIN_REPLY_ROOM = 64  # tokens a reply needs at least before we call the context full
LEAVE_HINT = "Use Ctrl + d or /bye to exit."
MAX_CONVERSATION_BYTES = 64 << 20  # /load refuses larger files (a conversation is text)
COMMANDS = ["/help", "/set", "/show", "/stats", "/clear", "/save", "/load", "/bye", "/exit"]

HELP = """\
Type a message and press Enter (Alt+Enter, or Esc then Enter, adds a line; a paste is one
message). Commands:
  /help                      this help
  /set budget N              draft tree nodes verified per target pass
  /set temperature T         0 = greedy
  /set top_p P               nucleus mass in (0, 1]
  /set max_tokens N          longest reply
  /set seed N|none           repeatable sampling
  /set system TEXT|none      system prompt (starts a new conversation)
  /set footer on|off         stats line after each reply
  /set overlap on|off        draft the next tree while the target verifies
  /set threads N             the CPU threads the models compute with
  /set parameter NAME VALUE  the same, as Ollama writes it
  /show [template]           settings, models, placement; or the chat template
  /stats                     last reply and session: load, prompt and generation speed,
                             accepted/pass, pass and draft time, GB/s
  /clear                     new conversation
  /save FILE, /load FILE     the conversation as JSON (asks before replacing a file or
                             a conversation not saved)
  /bye, /exit                leave (also Ctrl+D); Ctrl+C stops a reply
Ctrl+R searches the history. \"\"\" on a line of its own starts and ends a multi-line message."""


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
        write_atomic(path, json.dumps(extra | {"messages": self.messages()}, indent=2,
                                      ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> Conversation:
        try:
            if path.exists() and not path.is_file():  # a folder, a device, a pipe: never read
                raise UserError(f"{path} is not a file")
            size = path.stat().st_size
            if size > MAX_CONVERSATION_BYTES:
                raise UserError(f"{path} holds {size:,} bytes: too large for a saved "
                                f"conversation (at most {MAX_CONVERSATION_BYTES:,})")
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
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


def history_file() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("specexec")) / "chat_history"


def terminal_reader(history: Path | None, swallow: Callable[[], bool] = lambda: False
                    ) -> Callable[[str], str]:
    """prompt_toolkit's line editor: bracketed paste, Alt+Enter for a new line, Ctrl+R search,
    completion of commands, and a history file (kept in memory when it cannot be written).
    A Ctrl+C for which `swallow()` is true does nothing (it belongs to a reply's stop)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _(event):
        if not swallow():
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    store = InMemoryHistory()
    if history is not None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            # Every message typed is in it: readable by its owner alone.
            os.close(os.open(history, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
            try:
                os.chmod(history, 0o600)
            except OSError:
                pass  # not ours to change: it is kept as it is
            store = FileHistory(str(history))
        except OSError:
            pass  # a read-only home: history for this session only
    completer = WordCompleter(COMMANDS, sentence=True, pattern=None)
    session = PromptSession(history=store, key_bindings=keys, completer=completer,
                            complete_while_typing=False, enable_history_search=False)
    return lambda prompt: session.prompt(prompt)


class Stopping:
    """Ctrl+C during a reply: the first one stops it (KeyboardInterrupt); more within `GRACE`
    seconds, while it is being stopped, are swallowed, so that none is left pending to end the
    chat at the next line. (After that, one stops it again: none can be lost for good.)"""

    GRACE = 2.0

    def __init__(self):
        self.since: float | None = None

    def handler(self, signum, frame):
        now = time.monotonic()
        if self.since is None or now - self.since > self.GRACE:
            self.since = now
            raise KeyboardInterrupt

    def just_stopped(self) -> bool:
        """Whether a reply was stopped within `GRACE` seconds and nothing typed since (a Ctrl+C
        now belongs to that stop)."""
        return self.since is not None and time.monotonic() - self.since < self.GRACE

    @contextmanager
    def during_reply(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.since = None
        old = signal.signal(signal.SIGINT, self.handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)


@contextmanager
def as_typed(attr: str, key: str):
    """A setting's range error named as the user typed it in chat (`/set max_tokens 0`: "max_tokens
    must be at least 1"), not as the command line's flag (--max-new-tokens)."""
    try:
        yield
    except UserError as e:
        raise UserError(str(e).replace("--" + attr.replace("_", "-"), key, 1)) from None


class ChatREPL:
    """The loop: read a message or a command, run it, print. `read(prompt)` reads a line (a
    terminal line editor or `input` by default; tests pass their own)."""

    def __init__(self, pipe: Pipeline, settings: DecodeSettings, console: Console,
                 system: str | None = None, footer: bool = True, history: Path | None = None,
                 tuned: bool = False, tip: bool = False, read: Callable[[str], str] | None = None):
        self.pipe, self.settings, self.console = pipe, settings, console
        self.conv = Conversation(system=system)
        self.footer, self.tuned, self.tip = footer, tuned, tip
        self.stopping = Stopping()
        # The terminal's line editor keeps what was typed (Up recalls it); other readers do not.
        self.recalls = read is None and sys.stdin.isatty() and sys.stdout.isatty()
        # Piped input holds messages, not answers: questions then take their default.
        self.asks = read is not None or sys.stdin.isatty()
        if read is None:
            read = terminal_reader(history, self.stopping.just_stopped) if self.recalls else input
        self.read = read
        self.history: list[Stats] = []
        # The file the conversation was last saved to or loaded from, and its turns then.
        self.saved_as: Path | None = None
        self.saved_turns: list[dict] = []

    def say(self, text: str, style: str | None = None) -> None:
        """Print `text` as it is: user strings never pass through rich markup."""
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

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

    def ask(self, question: str, default: bool = True) -> bool:
        """A yes or no; asked again for any other answer (a message typed there is not taken
        for a no). End of input or Ctrl+C: no. Input that is not a terminal: the default."""
        if not self.asks:
            self.say(f"{question} {'yes' if default else 'no'} (input is not a terminal)", "dim")
            return default
        while True:
            try:
                answer = self.read(f"{question} [{'Y/n' if default else 'y/N'}] ").strip().lower()
            except (EOFError, KeyboardInterrupt):
                return False
            if answer in ("y", "yes", "n", "no", ""):
                return answer in ("y", "yes") or (default and not answer)
            self.say("Please answer y or n.", "dim")

    def may_replace_conversation(self, command: str) -> bool:
        """Whether the conversation may go: it is saved as it stands, empty, or the user says so."""
        turns = self.conv.turns
        if not turns or turns == self.saved_turns:
            return True
        return self.ask(f"{command} ends this conversation ({len(turns)} messages, not saved; "
                        "/save FILE keeps it). Go on?", default=False)

    def saved(self, path: Path | None) -> None:
        """Note the conversation as saved in `path` (None: a new one, saved nowhere)."""
        self.saved_as = path.resolve() if path else None
        self.saved_turns = [dict(t) for t in self.conv.turns] if path else []

    def new_conversation(self, system: str | None) -> None:
        """An empty conversation, saved nowhere (the last one's file is not its own)."""
        self.conv = Conversation(system=system)
        self.saved(None)

    # ---- the loop ----------------------------------------------------------------------
    def welcome(self) -> None:
        self.say(what_runs(self.pipe, self.settings.budget, self.tuned))
        if self.tip:
            self.say("tip: `specexec profile` tunes the budget and placement to this machine", "dim")
        self.say("/help for commands, /bye or Ctrl+D to leave, Ctrl+C stops a reply", "dim")

    def loop(self) -> None:
        self.welcome()
        while True:
            try:
                line = self.read_message()
            except KeyboardInterrupt:  # Ctrl+C at the prompt: say how to leave, as Ollama does
                if not self.stopping.just_stopped():  # (not for one more press of a stop)
                    self.say(LEAVE_HINT, "dim")
                continue
            if line is None:
                self.console.print()
                return
            self.stopping.since = None  # a line typed since: a Ctrl+C is no more part of a stop
            text = line.strip()
            if not text:
                continue
            try:
                if text.startswith("/") and "\n" not in text:
                    if self.command(text) == "exit":
                        return
                else:
                    self.turn(line)
            except UserError as e:
                self.console.print(RichText.assemble(("error:", "bold red"), " ", str(e)), soft_wrap=True)
            except KeyboardInterrupt:
                self.say("interrupted", "dim")
            except Exception as e:  # noqa: BLE001 - a failed turn must not end the conversation
                first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
                self.console.print(RichText.assemble(("error:", "bold red"), " ", first,
                                                     " (the conversation goes on)"), soft_wrap=True)

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
        self.say(f"The context is full: the conversation and this message take {len(ids)} of "
                 f"{context} tokens, which leaves less than the {room} kept for a reply{more}.")
        if not self.ask("Drop the oldest turns to make room?"):
            self.say("Nothing sent. /clear starts a new conversation.", "dim")
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
        self.say(f"Dropped the {dropped} oldest messages.", "dim")
        return ids

    def turn(self, message: str) -> None:
        ids = self.fit_context(message)
        if ids is None:
            return
        self.conv.turns.append({"role": "user", "content": message})
        reply, done, interrupted = "", None, False
        stats = Stats(prompt_tokens=len(ids), reused_prompt_tokens=self.pipe.target.cached(ids))
        status = self.console.status("[dim]thinking...[/]", spinner="dots")
        with self.stopping.during_reply(), keys_held():
            try:
                status.start()
                for event in self.pipe.generate(ids, self.settings):
                    if isinstance(event, Pass):
                        stats.add(event)
                    elif isinstance(event, Text) and event.text:
                        if not reply:
                            status.stop()
                        reply += event.text
                        self.console.out(event.text, end="", highlight=False)
                        self.console.file.flush()
                    elif isinstance(event, Notice):
                        status.stop()
                        self.console.print()
                        self.say(f"note: {event.message}", "yellow")
                    elif isinstance(event, Done):
                        done = event
            except KeyboardInterrupt:
                interrupted = True
            except Exception:
                # A failed turn is not part of the conversation; it goes on without it.
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
            stats.stop_reason = "interrupted"
            if reply:
                self.history.append(stats)
            self.say("stopped; what was said is kept" if reply else
                     "stopped before the reply began; the message was not kept" +
                     (" (Up recalls it)" if self.recalls else ""), "dim")
            return
        self.history.append(done.stats)
        if done.stats.stop_reason == "context":
            self.say("The reply filled the model's context. The next message will offer to drop "
                     "the oldest turns; /clear starts afresh.", "yellow")
        elif done.stats.stop_reason == "length":
            self.say(f"(stopped at {self.settings.max_new_tokens} tokens; /set max_tokens N for "
                     "longer replies)", "dim")
        if self.footer:
            self.say(stats_line(done.stats, stop=False), "dim")

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
        self.say(HELP)

    def cmd_set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        if key.lower() == "parameter":  # Ollama: /set parameter temperature 0.7
            key, _, value = value.strip().partition(" ")
        key, value = key.lower().replace("-", "_"), value.strip()
        if key == "system" and not value:
            raise UserError("usage: /set system TEXT, or /set system none for the template's default")
        if not key or not value:
            raise UserError("usage: /set budget|temperature|top_p|max_tokens|seed|system|footer|"
                            "overlap|threads VALUE")
        if key == "system":
            if not self.may_replace_conversation("A new system prompt"):
                self.say("The system prompt and the conversation stay as they were.", "dim")
                return
            self.new_conversation(None if value.lower() == "none" else value)
            self.say("System prompt set; new conversation.", "dim")
            return
        if key in ("overlap", "footer"):
            if value.lower() not in ("on", "off"):
                raise UserError(f"usage: /set {key} on|off")
            if key == "overlap":
                self.settings = replace(self.settings, overlap=value.lower() == "on")
            else:
                self.footer = value.lower() == "on"
            self.say(f"{key} = {value.lower()}", "dim")
            return
        if key == "threads":  # the model's CPU threads, from the next reply on
            try:
                threads = int(value)
            except ValueError:
                raise UserError(f"threads takes a whole number (got {value!r})") from None
            with as_typed("threads", "threads"):
                check_threads(threads)
            torch.set_num_threads(threads)
            self.say(f"threads = {threads}", "dim")
            return
        fields_ = {"budget": ("budget", int), "temperature": ("temperature", float),
                   "top_p": ("top_p", float), "max_tokens": ("max_new_tokens", int),
                   "max_new_tokens": ("max_new_tokens", int), "num_predict": ("max_new_tokens", int),
                   "seed": ("seed", int)}
        if key not in fields_:
            raise UserError(f"cannot set {key}; settable: budget, temperature, top_p, "
                            "max_tokens, seed, system, footer, overlap, threads")
        attr, kind = fields_[key]
        if key == "seed" and value.lower() == "none":
            parsed = None
        else:
            try:
                parsed = kind(value)
            except ValueError:
                raise UserError(f"{key} takes a number (got {value!r})") from None
        with as_typed(attr, key):
            self.settings = replace(self.settings, **{attr: parsed})  # validates
        self.say(f"{key} = {getattr(self.settings, attr)}", "dim")
        planned = self.pipe.target.placement
        if key == "budget" and planned and planned.work_bytes and parsed > planned.tree_budget:
            self.say(f"The target was placed with memory for {planned.tree_budget}-node trees; a "
                     "larger tree may not fit (the budget then shrinks and says so). Start with "
                     "--budget to place it for more.", "dim")

    def cmd_show(self, arg: str) -> None:
        s, pipe = self.settings, self.pipe
        if arg.lower() == "template":
            template = getattr(pipe.tokenizer, "chat_template", None)
            self.say(template if isinstance(template, str) else "(no chat template)")
            return
        if arg and arg.lower() not in ("info", "settings", "parameters"):
            raise UserError("usage: /show [template]")
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        rows = [("target", pipe.target_name), ("draft", pipe.draft_name),
                ("placement", pipe.placement_text()),
                ("context", f"{pipe.target.context_length} tokens"),
                ("budget", str(s.budget)), ("temperature", str(s.temperature)),
                ("top_p", str(s.top_p)), ("max_tokens", str(s.max_new_tokens)),
                ("seed", str(s.seed)), ("overlap", "on" if s.overlap else "off"),
                ("threads", str(torch.get_num_threads())),
                ("system", self.conv.system or "(the template's default)"),
                ("footer", "on" if self.footer else "off"),
                ("conversation", f"{len(self.conv.turns)} messages")]
        for k, v in rows:
            table.add_row(k, RichText(v))
        self.console.print(table)

    def cmd_stats(self, _: str) -> None:
        if not self.history:
            self.say("No replies yet.")
            return
        last = self.history[-1]
        self.say(f"last reply: {stats_line(last)}")
        all_ = total(self.history)
        all_.load_s = self.pipe.load_s
        replies = f"{len(self.history)} repl{'y' if len(self.history) == 1 else 'ies'}"
        self.say(f"session ({replies}): {stats_line(all_, load=True, stop=False)}")

    def cmd_clear(self, _: str) -> None:
        self.new_conversation(self.conv.system)
        self.say("New conversation.", "dim")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise UserError("usage: /save FILE")
        path = Path(os.path.expanduser(arg)).resolve()  # a link's file, not the link
        if path.exists() and path != self.saved_as:  # not this conversation's file
            if not path.is_file():
                raise UserError(f"{path} is not a file")
            if not self.ask(f"{path} exists. Replace it?", default=False):
                self.say("Not saved.", "dim")
                return
        self.conv.save(path, {"target": self.pipe.target_name, "draft": self.pipe.draft_name,
                              "settings": vars(self.settings)})
        self.saved(path)
        self.say(f"Saved {len(self.conv.turns)} messages to {path}.", "dim")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise UserError("usage: /load FILE")
        path = Path(os.path.expanduser(arg))
        loaded = Conversation.load(path)
        if not self.may_replace_conversation("/load"):
            self.say("Not loaded.", "dim")
            return
        self.conv = loaded
        self.saved(path)
        self.say(f"Loaded {len(self.conv.turns)} messages from {path}.", "dim")
        if self.conv.turns:
            last = self.conv.turns[-1]
            self.say(f"last ({last['role']}): {last['content'][:200]}")
