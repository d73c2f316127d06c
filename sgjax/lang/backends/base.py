"""The interface every backend implements, what each supports, and the choice scoring they share.

A backend receives resolved gens (sampling.resolve: no field left None) and the state's Prompt.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator

from sgjax.lang.choices import mean
from sgjax.lang.primitives import Gen, Select


@dataclasses.dataclass
class ChoiceScores:
    """Each choice's tokens after the prompt as [logprob, token id, text or None]; with the prompt left out,
    the same tokens' logprobs (the first one 0: nothing precedes it), when the method needs them."""
    token_logprobs: list[list[list]]
    unconditional: list[list[float]] | None = None
    meta: dict = dataclasses.field(default_factory=dict)


class Backend:
    role_markers: dict[str, tuple[str, str]]  # role -> (prefix, suffix), from the model's chat template
    # The text standing for one image in the prompt (a vision model's placeholder tokens), which the state
    # writes where a program adds an image; None: the backend takes no images, or places them itself (OpenAI)
    image_placeholder: str | None = None
    supports_speculation = False  # API speculative execution (OpenAI-style backends)
    # gen fields this backend cannot honour when set -> why (a clear error, never a silent drop)
    unsupported: dict[str, str] = {}

    def check(self, gen: Gen) -> None:
        """Raise on a resolved gen that asks for something this backend cannot do."""
        for field, why in self.unsupported.items():
            value = getattr(gen, field)
            if value:  # every such field's default is falsy (0, None, False, [])
                raise ValueError(f"gen {gen.name!r}: {field}={value!r} is not supported by {type(self).__name__}: "
                                 f"{why}")

    def generate(self, prompt, gen: Gen) -> tuple[str, dict]:
        """(generated text, meta information)."""
        raise NotImplementedError

    def stream(self, prompt, gen: Gen) -> Iterator[tuple[str, dict]]:
        """(text delta, meta information so far) pairs; the default generates at once."""
        yield self.generate(prompt, gen)

    def score_choices(self, prompt, choices: list[str], unconditional: bool) -> ChoiceScores:
        raise NotImplementedError(f"{type(self).__name__} cannot score choices")

    def select(self, prompt, sel: Select) -> tuple[int, dict]:
        """(index of the choice sel.choices_method picks, meta information with each choice's logprobs)."""
        scores = self.score_choices(prompt, sel.choices, sel.choices_method.needs_unconditional)
        logprobs = [[entry[0] for entry in tokens] for tokens in scores.token_logprobs]
        index, extra = sel.choices_method.pick(logprobs, scores.unconditional)
        return index, {"normalized_prompt_logprobs": [mean(lp) for lp in logprobs],
                       "input_token_logprobs": scores.token_logprobs,
                       "output_token_logprobs": [[] for _ in sel.choices], **scores.meta, **extra}

    def flush_cache(self) -> bool:
        raise NotImplementedError(f"{type(self).__name__} has no cache to flush")

    def get_server_info(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} has no server information")

    def image_data(self, prompt) -> list[str] | None:
        """The prompt's images as data URLs, in the order of their placeholders in its text (the state writes
        `image_placeholder` where each image is added); None without images. Raises for a text-only model."""
        images = [im for m in prompt.messages for im in m.get("images") or []]
        if not images:
            return None
        if self.image_placeholder is None:
            raise ValueError(f"{type(self).__name__} serves a text-only model: it takes no images")
        return [f"data:{im.mime};base64,{base64.b64encode(im.data).decode()}" for im in images]

    def no_images(self, prompt, what: str) -> None:
        if any(m.get("images") for m in prompt.messages):
            raise ValueError(f"{what} after an image is not supported by {type(self).__name__}")


def choice_start(prefix_ids: list[int], full_ids: list[int]) -> int:
    """Where a choice's tokens begin in tokens(prefix + choice): after the common token prefix (the
    prefix's last token may merge with the choice), and at least one token before the end."""
    n = 0
    while n < min(len(prefix_ids), len(full_ids)) and prefix_ids[n] == full_ids[n]:
        n += 1
    return max(1, min(n, len(full_ids) - 1))
