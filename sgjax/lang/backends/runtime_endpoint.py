"""Backend over an sgjax (or SGLang) server's native API: /generate. Programs that share a prefix reuse its
KV pages through the server's radix cache. Supports every gen field, select with every choices method and
streaming with meta information per chunk; images with a vision-language model (not in a select's prompt)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from sgjax.engine.chat_template import DEFAULT
from sgjax.lang.backends.base import Backend, ChoiceScores, choice_start
from sgjax.lang.primitives import Gen
from sgjax.lang.sampling import engine_params, logprob_options


class RuntimeEndpoint(Backend):
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0, **_ignored):
        # SGLang's chat_template_name / verify are accepted: the server reports its own role markers
        self.base_url, self.api_key, self.timeout = base_url.rstrip("/"), api_key, timeout
        info = self._request("GET", "/get_model_info")
        markers = info.get("role_markers") or DEFAULT
        self.role_markers = {role: tuple(pair) for role, pair in markers.items()}
        self.image_placeholder = info.get("image_placeholder")
        self.model_info = info

    def _request(self, method: str, path: str, body: dict | None = None, stream: bool = False):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            response = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise RuntimeError(f"{path} failed with HTTP {e.code}: {detail}") from None
        if stream:
            return response
        with response:
            return json.loads(response.read())

    def _body(self, prompt, gen: Gen) -> dict:
        images = self.image_data(prompt)
        return {"text": prompt.text, "sampling_params": engine_params(gen), **logprob_options(gen),
                **({"image_data": images} if images else {})}

    def generate(self, prompt, gen: Gen) -> tuple[str, dict]:
        out = self._request("POST", "/generate", self._body(prompt, gen))
        return out["text"], out["meta_info"]

    def stream(self, prompt, gen: Gen) -> Iterator[tuple[str, dict]]:
        response = self._request("POST", "/generate", {**self._body(prompt, gen), "stream": True}, stream=True)
        sent = ""
        with response:
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data:"):])
                text = chunk["text"]  # the text so far
                yield text[len(sent):], chunk["meta_info"]
                sent = text

    def score_choices(self, prompt, choices: list[str], unconditional: bool) -> ChoiceScores:
        """The prompt alone and prompt + each choice in one batch, with the ids and logprobs of their last
        tokens, to find where each choice's tokens begin; the unconditional scoring in a second."""
        self.no_images(prompt, "select")
        length = self._request("POST", "/generate", {"text": prompt.text, "sampling_params": {"max_new_tokens": 0}})
        start = max(0, length["meta_info"]["prompt_tokens"] - 4)  # merges reach back a token or two
        outs = self._request("POST", "/generate", {
            "text": [prompt.text] + [prompt.text + c for c in choices], "return_logprob": True,
            "logprob_start_len": start, "sampling_params": {"max_new_tokens": 0}})
        tail = [[tok for _, tok, _ in out["meta_info"]["input_token_logprobs"]] for out in outs]
        token_logprobs = []
        for out, ids in zip(outs[1:], tail[1:]):
            begin = choice_start(tail[0], ids)
            token_logprobs.append([list(e) for e in out["meta_info"]["input_token_logprobs"][begin:]])
        uncond = None
        if unconditional:
            alone = self._request("POST", "/generate", {
                "input_ids": [[e[1] for e in tokens] for tokens in token_logprobs], "return_logprob": True,
                "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 0}})
            uncond = [[lp or 0.0 for lp, _, _ in out["meta_info"]["input_token_logprobs"]] for out in alone]
        return ChoiceScores(token_logprobs, uncond,
                            {"cached_tokens": [o["meta_info"]["cached_tokens"] for o in outs[1:]]})

    def flush_cache(self) -> bool:
        """Empty the server's prefix cache; False if it refused (requests were running)."""
        try:
            self._request("POST", "/flush_cache", stream=True).close()
        except RuntimeError:
            return False
        return True

    def get_server_info(self) -> dict:
        return self._request("GET", "/get_server_info")
