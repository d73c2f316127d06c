"""Backend over any OpenAI-compatible endpoint, with the official openai client.

Programs with roles use /chat/completions (the server applies its own chat template); programs of
plain text use /completions. What the API cannot express falls back:
- select: with /completions, each choice's logprobs from `echo` + `logprobs` (one batched call), for
  every choices method; with chat only, the model answers under the instruction-free prompt and the
  choice its reply matches best is taken (no logprobs of the prompt exist there).
- regex (and dtype), top_k, min_p, ignore_eos and stop_token_ids are sent as `extra_body` (sgjax and
  SGLang servers take them; other servers reject them); json_schema becomes `response_format` (sent as an
  extra too, so /completions programs can use it).
- min_tokens, stop_regex and the logprob options of a gen raise (`unsupported`): use RuntimeEndpoint.
- images go as image_url parts (data URLs) of chat messages.
- stream=True streams the server's events, a text delta each, for chats and completions alike.
API speculative execution is on for /completions programs with @function(num_api_spec_tokens=N).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

from sgjax.engine.chat_template import DEFAULT
from sgjax.lang.backends.base import Backend, ChoiceScores
from sgjax.lang.choices import TokenLengthNormalized
from sgjax.lang.primitives import Gen, Select

WHY = "the OpenAI API has no such field; use sgl.RuntimeEndpoint"


class OpenAI(Backend):
    supports_speculation = True
    unsupported = {"min_tokens": WHY, "stop_regex": WHY, "return_logprob": WHY, "top_logprobs_num": WHY,
                   "logprob_start_len": WHY}

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, **client_kwargs):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, **client_kwargs)
        self.model = model
        self.role_markers = dict(DEFAULT)  # only for state.text(); the server renders chats itself
        self.num_api_calls = 0

    @staticmethod
    def _chat_messages(prompt) -> list[dict]:
        out = []
        finished = prompt.messages[:-1] if prompt.role is not None else prompt.messages
        if prompt.role is not None and prompt.messages[-1]["content"]:
            raise ValueError("with a chat API a gen must start the assistant message (the API cannot continue a "
                             "partial one)")
        for m in finished:
            content = m["content"]
            if m.get("images"):
                content = [{"type": "text", "text": content}] + [
                    {"type": "image_url", "image_url": {
                        "url": f"data:{im.mime};base64,{base64.b64encode(im.data).decode()}"}}
                    for im in m["images"]]
            out.append({"role": m["role"], "content": content})
        return out

    def _constraint_args(self, gen: Gen) -> dict:
        args, extra = {}, {}
        if gen.json_schema is not None:
            schema = json.loads(gen.json_schema) if isinstance(gen.json_schema, str) else gen.json_schema
            # in the body's extras: the client takes response_format for chats only, the server for both
            extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        if gen.regex is not None:
            extra["regex"] = gen.regex
        if gen.top_k != -1:
            extra["top_k"] = gen.top_k
        if gen.min_p:
            extra["min_p"] = gen.min_p
        if gen.ignore_eos:
            extra["ignore_eos"] = True
        if gen.stop_token_ids:
            extra["stop_token_ids"] = list(gen.stop_token_ids)
        if extra:
            args["extra_body"] = extra
        return args

    def _create(self, prompt, gen: Gen, **extra):
        """The chat or completion call the prompt needs (a chat once the program has roles)."""
        self.num_api_calls += 1
        common = dict(model=self.model, max_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p,
                      stop=gen.stop or None, seed=gen.seed, frequency_penalty=gen.frequency_penalty,
                      presence_penalty=gen.presence_penalty, **self._constraint_args(gen), **extra)
        common = {k: v for k, v in common.items() if v is not None}  # unset fields stay out of the body
        if prompt.messages:
            if prompt.role != "assistant":
                raise ValueError("with a chat API a gen must be inside an assistant message")
            return self.client.chat.completions.create(messages=self._chat_messages(prompt), **common)
        return self.client.completions.create(prompt=prompt.text, **common)

    @staticmethod
    def _text(choice) -> str:
        """A choice's text: a completion's, a chat message's, or a streamed chat delta's."""
        if hasattr(choice, "text"):
            return choice.text or ""
        message = getattr(choice, "message", None) or getattr(choice, "delta", None)
        return (message.content if message is not None else None) or ""

    def generate(self, prompt, gen: Gen) -> tuple[str, dict]:
        r = self._create(prompt, gen)
        usage = r.usage
        meta = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "finish_reason": r.choices[0].finish_reason} if usage else {}
        return self._text(r.choices[0]), meta

    def stream(self, prompt, gen: Gen) -> Iterator[tuple[str, dict]]:
        """The text as the server streams it: one delta per event; the meta information counts the chunks so
        far until the closing usage event gives the token counts."""
        meta: dict = {"finish_reason": None, "chunks": 0}
        for event in self._create(prompt, gen, stream=True, stream_options={"include_usage": True}):
            if event.usage is not None:
                meta = {**meta, "prompt_tokens": event.usage.prompt_tokens,
                        "completion_tokens": event.usage.completion_tokens}
            if not event.choices:
                continue
            choice = event.choices[0]
            meta = {**meta, "finish_reason": choice.finish_reason or meta["finish_reason"],
                    "chunks": meta["chunks"] + 1}
            delta = self._text(choice)
            if delta:
                yield delta, meta
        if meta.get("completion_tokens") is not None:
            yield "", meta  # the final counts, with nothing more to append

    def select(self, prompt, sel: Select) -> tuple[int, dict]:
        if prompt.messages:
            return self._select_by_reply(prompt, sel)
        return super().select(prompt, sel)

    def score_choices(self, prompt, choices: list[str], unconditional: bool) -> ChoiceScores:
        if unconditional:
            raise ValueError("unconditional_likelihood_normalized is not supported by the OpenAI backend (the API "
                             "cannot score text without its prompt); use sgl.RuntimeEndpoint")
        self.num_api_calls += 1
        r = self.client.completions.create(model=self.model, prompt=[prompt.text + c for c in choices],
                                           max_tokens=0, echo=True, logprobs=0, temperature=0)
        token_logprobs = []
        for choice in sorted(r.choices, key=lambda c: c.index):
            lp = choice.logprobs
            # the choice's tokens: those ending after the prompt text (the first may straddle it)
            token_logprobs.append([[v, None, tok] for v, off, tok in zip(lp.token_logprobs, lp.text_offset, lp.tokens)
                                   if off + len(tok) > len(prompt.text) and v is not None])
        return ChoiceScores(token_logprobs)

    def _select_by_reply(self, prompt, sel: Select) -> tuple[int, dict]:
        choices = sel.choices
        if not isinstance(sel.choices_method, TokenLengthNormalized):
            raise ValueError("with a chat API select matches the model's reply to the choices; choices_method "
                             "needs /completions (a program without roles) or sgl.RuntimeEndpoint")
        gen = Gen(None, max_tokens=max(8, max(len(c) for c in choices)), temperature=0.0, min_tokens=0,
                  top_k=-1, min_p=0.0)
        reply, meta = self.generate(prompt, gen)

        answer = reply.strip()

        def agreement(choice: str) -> int:
            n = 0
            while n < min(len(choice), len(answer)) and choice[n] == answer[n]:
                n += 1
            return n

        scores = [float(agreement(c)) for c in choices]
        return max(range(len(scores)), key=scores.__getitem__), {**meta, "reply": reply, "matched_characters": scores}

