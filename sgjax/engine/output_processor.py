"""What happens to a sampled token on the host: it is appended to its request, detokenized and checked
against the stop conditions (EOS and stop tokens, the grammar's end, stop strings, max_new_tokens, the
context length); and how a request's progress becomes the TokenDelta its caller receives.

Runs on the engine thread, once per sampled token (the host's per-token cost of serving lives here).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sgjax.engine.messages import Finished, TokenDelta
from sgjax.engine.request import Request


class OutputProcessor:
    def __init__(self, eos_token_ids: set[int], context_length: int,
                 finish: Callable[[Request, dict, str], None], progress: Callable[[Request, str], None]):
        """`finish(req, reason, text delta)` ends a request (it releases its KV); `progress(req, text delta)`
        reports a step's progress of one that goes on."""
        self.eos_token_ids, self.context_length = eos_token_ids, context_length
        self.finish, self.progress = finish, progress

    def append_token(self, req: Request, token: int, logprob: float, top: list[tuple[float, int]],
                     ids_logprobs: list[tuple[float, int]] = ()) -> None:
        p = req.params
        if p.max_new_tokens == 0:  # it ran only for its prompt logprobs
            return self.finish(req, {"type": "length", "length": 0}, "")
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.output_ids.append(token)
        req.output_logprobs.append(logprob)
        if p.top_logprobs_num:
            req.output_top_logprobs.append(top)
        if p.token_ids_logprob:
            req.output_ids_logprobs.append(list(ids_logprobs))
        finish = None
        if token in (p.stop_token_ids or ()) or (not p.ignore_eos and token in self.eos_token_ids):
            finish = {"type": "stop", "matched": token}  # the stop token's text is not part of the output...
        if req.detokenizer is not None and (finish is None or p.no_stop_trim):  # ...unless no_stop_trim
            req.detokenizer.add(token)
        if req.matcher is not None and finish is None:
            finish = advance_grammar(req, token)
        num_out = len(req.output_ids)
        if finish is None and (num_out >= p.max_new_tokens or len(req.prompt_ids) + num_out >= self.context_length):
            finish = {"type": "length", "length": len(req.output_ids)}
        if finish is not None and req.detokenizer is not None:
            req.detokenizer.flush()
        text = req.detokenizer.text if req.detokenizer is not None else ""
        for stop in p.stop_strings:
            # Only the newly decoded tail can complete a stop string.
            at = text.find(stop, max(0, len(req.text) - len(stop)))
            if at != -1:
                text, finish = text[:at + len(stop) * p.no_stop_trim], {"type": "stop", "matched": stop}
                break
        if finish is None and p.stop_regex is not None and len(text) > req.regex_checked:
            finish = match_stop_regex(req, text)
        if finish is None:
            # Hold back what could still turn out to be the start of a stop string.
            hold = max((len(s) - 1 for s in p.stop_strings), default=0)
            text = text[: max(len(req.text), len(text) - hold)]
        delta, req.text = text[len(req.text):], text
        if finish is not None:
            self.finish(req, finish, delta)
        else:
            self.progress(req, delta)

    @staticmethod
    def record_prompt_logprobs(batch: list[tuple[Request, int]], starts: list[int], targets: list[list[int]],
                               out) -> None:
        """Each chunk's prompt-token logprobs (StepOutput.prompt_*) into its request."""
        offset = 0
        for (req, n), start, per_chunk in zip(batch, starts, targets):
            k, ids = req.params.top_logprobs_num, req.params.token_ids_logprob or []
            for i, target in enumerate(per_chunk):
                if target >= 0:
                    row = offset + i
                    top = list(zip(out.prompt_top_logprobs[row, :k].tolist(), out.prompt_top_ids[row, :k].tolist()))
                    given = list(zip(out.prompt_ids_logprobs[row, :len(ids)].tolist(), ids)) if ids else []
                    # the chunk's i-th token predicts the prompt token at position start + i + 1
                    req.input_logprobs[start + i + 1] = (float(out.prompt_logprobs[row]), top, given)
            offset += n


REGEX_WINDOW = 1024  # characters before the new text that a stop_regex match may start in
# A search runs on the engine thread, between every request's steps: a pattern that backtracks for longer
# (nested quantifiers such as (.|\s)*) fails its own request instead of stalling all of them.
REGEX_TIMEOUT_S = 0.1


def match_stop_regex(req: Request, text: str) -> dict | None:
    """SGLang's stop_regex: the request ends once its text matches a pattern, which stays in the text (the finish
    reason names the pattern). Searched from shortly before the new text, so a long output costs no more per
    token than a short one."""
    start, req.regex_checked = max(0, req.regex_checked - REGEX_WINDOW), len(text)
    for pattern in req.params.stop_patterns:
        try:
            if pattern.search(text, start, timeout=REGEX_TIMEOUT_S):
                return {"type": "stop", "matched": pattern.pattern}
        except TimeoutError:
            return {"type": "abort", "message": f"the request cannot run: stop_regex {pattern.pattern!r} took over "
                                                f"{REGEX_TIMEOUT_S} s to search {len(text) - start} characters"}
    return None


def advance_grammar(req: Request, token: int) -> dict | None:
    """Feed the token to the request's matcher; the finish reason if the grammar is complete."""
    if not req.matcher.consume_token(token):
        return {"type": "abort", "message": f"token {token} broke the constraint: {req.matcher.get_error()}"}
    if req.matcher.is_stopped():  # nothing may follow but EOS: the output is complete
        return {"type": "stop", "matched": None}
    return None


def wants_prompt_logprobs(req: Request, n: int) -> bool:
    """Whether a chunk of n tokens of the request must return prompt-token logprobs."""
    start = req.params.logprob_start_len
    return start >= 0 and req.num_computed < len(req.prompt_ids) - 1 and req.num_computed + n >= max(start, 1)


def prompt_targets(req: Request, n: int) -> list[int]:
    """For each token of the request's next chunk of n, the prompt token after it if its logprob is wanted,
    else -1."""
    start, prompt = max(req.params.logprob_start_len, 1), req.prompt_ids
    if req.params.logprob_start_len < 0:
        return [-1] * n
    return [prompt[q + 1] if start <= q + 1 < len(prompt) else -1
            for q in range(req.num_computed, req.num_computed + n)]


def delta_of(req: Request, text: str) -> TokenDelta:
    """What the request gained since its last delta (it then counts as sent)."""
    start, end = req.num_sent, len(req.output_ids)
    req.num_sent = end
    tops = req.output_top_logprobs[start:end] if req.params.top_logprobs_num else []
    given = req.output_ids_logprobs[start:end] if req.params.token_ids_logprob else []
    prompt = None
    if len(req.input_logprobs) > req.num_input_sent:  # the prompt's, once computed (with the first token)
        prompt, req.num_input_sent = dict(req.input_logprobs), len(req.input_logprobs)
    fields = (req.wire_id, text, req.output_ids[start:end], req.output_logprobs[start:end], tops,
              req.first_token_time, req.cached_tokens, req.admit_time, given, prompt)
    if req.finished:
        return Finished(*fields, finish_reason=req.finish_reason)
    return TokenDelta(*fields)
