"""How select decides among its choices, given each choice's token logprobs after the prompt (SGLang's
`choices_method`s: `sgl.token_length_normalized`, `sgl.greedy_token_selection`,
`sgl.unconditional_likelihood_normalized`)."""

from __future__ import annotations


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


class ChoicesMethod:
    needs_unconditional = False  # also the choices' logprobs without the prompt

    def pick(self, logprobs: list[list[float]], unconditional: list[list[float]] | None = None) -> tuple[int, dict]:
        """(index of the chosen choice, extra meta information)."""
        raise NotImplementedError


class TokenLengthNormalized(ChoicesMethod):
    """The highest mean token logprob."""

    def pick(self, logprobs, unconditional=None):
        scores = [mean(lp) for lp in logprobs]
        return max(range(len(scores)), key=scores.__getitem__), {}


class GreedyTokenSelection(ChoicesMethod):
    """Token by token, keep the choices with the best logprob at that position; a choice that has ended
    continues at its mean, so a prefix of a longer choice still competes."""

    def pick(self, logprobs, unconditional=None):
        width = max(len(lp) for lp in logprobs)
        matrix = [lp + [mean(lp)] * (width - len(lp)) for lp in logprobs]
        alive = list(range(len(matrix)))
        for j in range(width):
            best = max(matrix[i][j] for i in alive)
            alive = [i for i in alive if matrix[i][j] == best]
            if len(alive) == 1:
                break
        return alive[0], {"greedy_logprob_matrix": matrix}


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The highest mean of (logprob after the prompt - logprob of the choice alone): discounts choices
    that are likely anywhere."""
    needs_unconditional = True

    def pick(self, logprobs, unconditional=None):
        if unconditional is None:
            raise ValueError("unconditional_likelihood_normalized needs the choices' unconditional logprobs")
        scores = [mean([a - b for a, b in zip(lp, un)]) for lp, un in zip(logprobs, unconditional)]
        return max(range(len(scores)), key=scores.__getitem__), {"normalized_unconditional_prompt_logprobs": scores}


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
