"""The interface every backend implements, and the choice scoring they share."""

from __future__ import annotations

from collections.abc import Iterator

from sgjax.lang.primitives import Gen


class Backend:
    role_markers: dict[str, tuple[str, str]]  # role -> (prefix, suffix), from the model's chat template
    supports_speculation = False  # API speculative execution (OpenAI-style backends)

    def generate(self, prompt, gen: Gen) -> tuple[str, dict]:
        """(generated text, meta information)."""
        raise NotImplementedError

    def stream(self, prompt, gen: Gen) -> Iterator[tuple[str, dict]]:
        """(text delta, meta so far) pairs; the default generates at once."""
        yield self.generate(prompt, gen)

    def select(self, prompt, choices: list[str]) -> tuple[int, dict]:
        """(index of the most likely choice, meta with each choice's normalized prompt logprob)."""
        raise NotImplementedError

    @staticmethod
    def no_images(prompt) -> None:
        if any(m.get("images") for m in prompt.messages):
            raise ValueError("this backend serves a text-only model: images need an OpenAI-style backend "
                             "of a vision model")


def choice_start(prefix_ids: list[int], full_ids: list[int]) -> int:
    """Where a choice's tokens begin in tokens(prefix + choice): after the common token prefix (the
    prefix's last token may merge with the choice), and at least one token before the end."""
    n = 0
    while n < min(len(prefix_ids), len(full_ids)) and prefix_ids[n] == full_ids[n]:
        n += 1
    return max(1, min(n, len(full_ids) - 1))


def pick(normalized: list[float]) -> int:
    return max(range(len(normalized)), key=lambda i: normalized[i])
