"""RequestBuilder: prompts (text, chat messages or token ids) and sampling parameters into validated
requests, on the caller's side of the engine: what is wrong with a request fails here, before the engine
sees it."""

from __future__ import annotations

import functools

import threading
import uuid

import numpy as np

from sgjax.cache.page_allocator import pages_for
from sgjax.config import EngineArgs
from sgjax.engine.image_inputs import ImagePreprocessor, ImagesNotSupportedError
from sgjax.engine.outputs import RequestOutput
from sgjax.engine.sampling_params import SamplingParams

Prompt = str | list[dict]  # text, or chat messages
# An image: a data: URL, a file path, base64 text, raw bytes or a PIL image (multimodal/image_io.py). `image_data`
# of one prompt: an image or a list of them; of a list of prompts: one such entry (or None) per prompt.
ImageData = object


class RequestBuilder:
    def __init__(self, args: EngineArgs, tokenizer, grammar, vocab_size: int, context_length: int,
                 num_usable_pages: int, images: ImagePreprocessor | None = None):
        """`tokenizer` and `grammar` None: dummy weights, token ids only. `images` None: a text-only model."""
        self.args, self.tokenizer, self.grammar, self.images = args, tokenizer, grammar, images
        self.vocab_size, self.context_length, self.num_usable_pages = vocab_size, context_length, num_usable_pages
        self.seeds = np.random.default_rng(args.random_seed)  # for requests that give no seed
        self._seeds_lock = threading.Lock()  # requests are built on the server's tokenizer threads
        self._max_prompt_chars: int | None = None

    @property
    def max_prompt_chars(self) -> int:
        """More characters than any prompt that fits the context can have: the context length times the longest
        token's text (a byte-level token's text has one character per byte). Longer texts are refused before
        they are tokenized, which for megabytes of text takes seconds."""
        if self._max_prompt_chars is None:
            try:
                longest = max(map(len, self.tokenizer.get_vocab()))
            except Exception:  # a tokenizer that cannot list its vocabulary: no bound but the exact check
                longest = 2**31
            self._max_prompt_chars = self.context_length * max(longest, 1)
        return self._max_prompt_chars

    def check_length(self, text: str) -> None:
        """ValueError for a text too long to fit the context, found without tokenizing it."""
        if len(text) > self.max_prompt_chars:
            raise ValueError(f"prompt has {len(text)} characters; at most {self.max_prompt_chars} can fit the "
                             f"context length ({self.context_length} tokens)")

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text prompt, with the BOS token unless the text already starts with it
        (text rendered by a chat template)."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer (dummy weights); pass input_ids")
        self.check_length(text)
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    @functools.cached_property
    def image_placeholder(self) -> str | None:
        """The text that stands for one image in a chat prompt, as the model's chat template writes it (Qwen:
        <|vision_start|><|image_pad|><|vision_end|>); build() expands its token to the image's. None: a
        text-only model."""
        if self.images is None:
            return None
        cfg = self.images.cfg
        wrap = cfg.image_wrapper_ids
        ids = [wrap[0], cfg.image_token_id, wrap[1]] if len(wrap) == 2 else [cfg.image_token_id]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            template_kwargs: dict | None = None) -> list[int]:
        """Token ids of the chat (and tool definitions) as the model's template renders them; `template_kwargs`:
        extra variables the template reads (e.g. Qwen3's enable_thinking)."""
        extra = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        self.check_length(text)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompts(self, prompt, input_ids) -> tuple[list[list[int]], bool]:
        """Each prompt's token ids (text tokenized, chat messages through the template), and whether the
        caller gave one prompt rather than a list."""
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt and input_ids")
        if input_ids is not None:
            single = not input_ids or isinstance(input_ids[0], (int, np.integer))
            return ([list(input_ids)] if single else [list(x) for x in input_ids]), single
        single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict))
        items = [prompt] if single else list(prompt)
        return [self._tokenize(p) for p in items], single

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer (dummy weights); pass input_ids")
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return self.apply_chat_template(prompt)
        raise ValueError(f"a prompt must be a string or a list of chat messages; got {type(prompt).__name__}")

    def images_per_prompt(self, image_data: ImageData | None, num_prompts: int, single: bool) -> list[list] | None:
        """`image_data` as one list of images per prompt (None: no images at all)."""
        if image_data is None or (isinstance(image_data, list) and not image_data):
            return None
        if self.images is None:
            raise ImagesNotSupportedError(f"{self.args.model_path} is a text-only model ({self.vocab_size}-token "
                                          "vocabulary, no vision tower); it takes no images")
        if single:
            return [list(image_data) if isinstance(image_data, list) else [image_data]]
        if not isinstance(image_data, list) or len(image_data) != num_prompts:
            raise ValueError(f"image_data for {num_prompts} prompts must be a list of {num_prompts} entries (an image, "
                             "a list of images, or None per prompt)")
        return [[] if x is None else list(x) if isinstance(x, list) else [x] for x in image_data]

    def build(self, prompts: list[list[int]], params: SamplingParams,
              rid: str | list[str] | None = None, images: list[list] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt and sample (n), validated (ValueError naming the problem). `rid`: the
        caller's id of the whole request, or one per prompt; samples and prompts under one id get suffixes.
        `images`: each prompt's images (images_per_prompt), its placeholders expanded here."""
        if isinstance(rid, list) and len(rid) != len(prompts):
            raise ValueError(f"rid has {len(rid)} ids for {len(prompts)} prompts")
        multimodal = [None] * len(prompts)
        if images is not None:
            prompts = list(prompts)
            for k, prompt_images in enumerate(images):
                if prompt_images:
                    prompts[k], multimodal[k] = self.images.prepare(list(prompts[k]), prompt_images)
        if params.constraint is not None:
            if self.grammar is None:
                raise ValueError("constrained decoding needs the model's tokenizer (this engine has dummy weights)")
            # Compiled here, so a bad constraint fails as a ValueError before it is sent (the core's copy of the
            # grammar then comes from the compiler's cache in this process)
            self.grammar.matcher(params.constraint)
        outputs = []
        for k, ids in enumerate(prompts):
            self._validate_prompt(ids, params)
            if params.seed is not None:
                base_seed = params.seed
            else:
                with self._seeds_lock:
                    base_seed = int(self.seeds.integers(2**31))
            group = uuid.uuid4().hex if params.n > 1 else None
            user_rid = rid[k] if isinstance(rid, list) else rid
            for i in range(params.n):
                if isinstance(rid, list):
                    name = user_rid if params.n == 1 else f"{user_rid}-{i}"
                else:
                    name = rid if rid and len(prompts) * params.n == 1 else \
                        f"{rid}-{len(outputs)}" if rid else uuid.uuid4().hex
                outputs.append(RequestOutput(rid=name, prompt_ids=list(map(int, ids)), params=params,
                                             seed=base_seed + i, group=group, user_rid=user_rid,
                                             images=multimodal[k]))
        return outputs

    def _validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}); got {max(params.logit_bias)}")
        if params.stop_token_ids and max(params.stop_token_ids) >= vocab:
            raise ValueError(f"stop_token_ids must be in [0, {vocab}); got {max(params.stop_token_ids)}")
        if params.token_ids_logprob and max(params.token_ids_logprob) >= vocab:
            raise ValueError(f"token_ids_logprob must be in [0, {vocab}); got {max(params.token_ids_logprob)}")
        if len(ids) >= self.context_length:
            raise ValueError(f"prompt has {len(ids)} tokens; context length is {self.context_length}")
        longest = min(len(ids) + params.max_new_tokens, self.context_length)
        pages = pages_for(longest, self.args.page_size)
        if pages > self.num_usable_pages:
            raise ValueError(f"a request of {longest} tokens needs {pages} KV pages; the pool has "
                             f"{self.num_usable_pages}")
