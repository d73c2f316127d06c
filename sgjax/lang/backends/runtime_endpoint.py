"""Backend over an sgjax (or SGLang) server's native API: /generate. Programs that share a prefix
reuse its KV pages through the server's radix cache."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from sgjax.lang.backends.base import Backend, choice_start, pick
from sgjax.engine.chat_template import DEFAULT
from sgjax.lang.primitives import Gen


class RuntimeEndpoint(Backend):
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self.base_url, self.api_key, self.timeout = base_url.rstrip("/"), api_key, timeout
        info = self._request("GET", "/get_model_info")
        markers = info.get("role_markers") or DEFAULT
        self.role_markers = {role: tuple(pair) for role, pair in markers.items()}
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

    def generate(self, prompt, gen: Gen) -> tuple[str, dict]:
        self.no_images(prompt)
        out = self._request("POST", "/generate", {"text": prompt.text, "sampling_params": gen.sampling_params()})
        return out["text"], out["meta_info"]

    def stream(self, prompt, gen: Gen) -> Iterator[tuple[str, dict]]:
        self.no_images(prompt)
        response = self._request("POST", "/generate", {"text": prompt.text, "sampling_params": gen.sampling_params(),
                                                       "stream": True}, stream=True)
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

    def select(self, prompt, choices: list[str]) -> tuple[int, dict]:
        """One batch: the prompt alone and prompt + each choice, with the ids and logprobs of their last
        tokens, to find where each choice's tokens begin and average their logprobs."""
        self.no_images(prompt)
        length = self._request("POST", "/generate", {"text": prompt.text, "sampling_params": {"max_new_tokens": 0}})
        start = max(0, length["meta_info"]["prompt_tokens"] - 4)  # merges reach back a token or two
        outs = self._request("POST", "/generate", {
            "text": [prompt.text] + [prompt.text + c for c in choices], "return_logprob": True,
            "logprob_start_len": start, "sampling_params": {"max_new_tokens": 0}})
        tail = [[tok for _, tok, _ in out["meta_info"]["input_token_logprobs"]] for out in outs]
        scores = []
        for out, ids in zip(outs[1:], tail[1:]):
            begin = choice_start(tail[0], ids)
            logprobs = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][begin:]]
            scores.append(sum(logprobs) / len(logprobs))
        return pick(scores), {"normalized_prompt_logprobs": scores,
                              "cached_tokens": [o["meta_info"]["cached_tokens"] for o in outs[1:]]}
