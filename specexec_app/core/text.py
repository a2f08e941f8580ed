"""Text and token ids: the chat-template encoder and the streaming detokenizer (one of each)."""

from __future__ import annotations

from specexec_app.errors import UserError


def encode_chat(tokenizer, messages: list[dict], name: str = "the model") -> list[int]:
    """Token ids of `messages` ({"role", "content"}) through the tokenizer's chat template, ready
    for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{name} has no chat template; use --raw")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


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
