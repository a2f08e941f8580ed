"""Text and token ids: the chat-template encoder and the streaming detokenizer (one of each)."""

from __future__ import annotations

import inspect
import re

from specexec_app.errors import UserError

_MARK = "\ue000{}\ue001"  # a message's place in its template (private-use characters)


def encode_chat(tokenizer, messages: list[dict], name: str = "the model") -> list[int]:
    """Token ids of `messages` ({"role", "content"}) through the tokenizer's chat template, ready
    for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{name} has no chat template; use --raw")
    # A message may hold a control token's text ("<|im_end|>" typed or pasted): it must stay
    # text. Parsed as the token, it would end its turn, and the rest could pose as a system or
    # an assistant turn. A recent transformers (5.24 has it) keeps it text itself; else below.
    if "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False,
                                                  sanitize_control_tokens=True))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Special tokens only: split_special_tokens leaves other added tokens (runs of spaces in
    # some vocabularies) as they are, and a message holding one encodes as usual.
    controls = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                if getattr(t, "special", True)]
    held = sorted({c for m in messages for c in controls
                   if c and isinstance(m.get("content"), str) and c in m["content"]})
    if not held:
        return tokenizer(text, add_special_tokens=False).input_ids
    # The template's own text is tokenized with its control tokens, each message's with them
    # split into plain text (which tokenizes a message's first characters apart from the
    # template's last: a rare case, and a template that drops a message or reads its content
    # is refused rather than risked).
    marked = [dict(m, content=_MARK.format(i)) for i, m in enumerate(messages)]
    pieces = re.split(_MARK.format(r"(\d+)"),
                      tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False))
    order = [int(i) for i in pieces[1::2]]
    # The content as the template writes it: as it is, or trimmed (Llama 3's templates trim).
    for shape in (str, str.strip):
        contents = [shape(m["content"]) for m in messages]
        if sorted(order) == list(range(len(messages))) and text == "".join(
                contents[int(p)] if k % 2 else p for k, p in enumerate(pieces)):
            break
    else:
        raise UserError(f"a message holds {held[0]!r}, a control token of {name}, and its chat "
                        "template does not let it be kept as plain text; remove it")
    ids = []
    for k, piece in enumerate(pieces):
        if k % 2:
            piece = contents[int(piece)]
        if piece:
            ids += tokenizer(piece, add_special_tokens=False,
                             split_special_tokens=bool(k % 2)).input_ids
    return ids


class Detokenizer:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Each push decodes only a window: the ids from the start of the previous delta on (they give
    the new ones their context: a leading space, a byte sequence begun there), so a long reply
    costs linear time, not quadratic."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # the window's first id
        self.read = 0    # ids before this one have had their text emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):  # nothing new, or a character cut
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
