"""The reply's text as it streams."""

import random

from specexec_app.core.text import Detokenizer


def test_streamed_text_is_the_decoded_reply(tokenizer):
    """The text deltas of a reply, pushed a token or a few at a time, add up to the decoded
    reply: no character split (emoji and accents span several byte-level tokens), no space lost."""
    text = ("Déjà vu 🙂🚀 naïve café — “quotes” and code:\n    def f(x):\n        return x * 2\n"
            "日本語のテキスト, then plain words again. ") * 5
    ids = tokenizer(text).input_ids
    for sizes in ([1], [1, 2, 3, 5, 8]):
        rng = random.Random(0)
        detok, out, at = Detokenizer(tokenizer), [], 0
        while at < len(ids):
            n = rng.choice(sizes)
            delta = detok.push(ids[at:at + n])
            assert "\ufffd" not in delta
            out.append(delta)
            at += n
        assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=True)
