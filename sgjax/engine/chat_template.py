"""Role markers (the text before and after a message of each role) read off a model's chat template.

A program adds role markers as it goes (`s += user("hi")`), so it needs each role's prefix and suffix
as text. They come from rendering the tokenizer's own template with a sentinel message and taking
the difference with the conversation before it, so whatever the model was trained with is used.
"""

from __future__ import annotations

DEFAULT = {"system": ("SYSTEM: ", "\n"), "user": ("USER: ", "\n"), "assistant": ("ASSISTANT: ", "\n")}
_SENTINEL = "\x00SGJAX_CONTENT\x00"


def role_markers(tokenizer) -> dict[str, tuple[str, str]]:
    """role -> (prefix, suffix); a plain "ROLE: " format if the tokenizer has no chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return dict(DEFAULT)
    render = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False)  # noqa: E731
    before = {"system": [], "user": [{"role": "system", "content": "S"}],
              "assistant": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    markers = {}
    for role, history in before.items():
        try:
            prev = render(history) if history else ""
            full = render(history + [{"role": role, "content": _SENTINEL}])
        except Exception:  # the template rejects this conversation shape (e.g. no system role)
            markers[role] = DEFAULT[role]
            continue
        if not full.startswith(prev) or _SENTINEL not in full:
            markers[role] = DEFAULT[role]
            continue
        prefix, _, suffix = full[len(prev):].partition(_SENTINEL)
        markers[role] = (prefix, suffix)
    return markers
