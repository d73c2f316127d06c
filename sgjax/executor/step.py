"""What the model runner hands back and forth for one step: its packed host inputs, the handle of a launched
step, and the results brought to the host."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sgjax.executor.sampler import MAX_TOKEN_IDS_LOGPROB, TOP_LOGPROBS, SamplerFeatures


@dataclasses.dataclass
class PreparedStep:
    ints: np.ndarray  # the step's int32 host arrays, packed (host_inputs.py): token ids, metadata, ...
    floats: np.ndarray  # its float32 ones: sampling parameters
    program: tuple[int, bool, bool]  # (token count it is padded to, with prompt logprobs, grouped)
    features: SamplerFeatures
    num_chunks: int
    num_tokens: int
    kv_tokens: int  # tokens of K/V its attention must read at least (contexts; a shared prefix once)


@dataclasses.dataclass
class StepHandle:
    hidden: jax.Array  # [max_seqs, H]: each chunk's last hidden state (donated to the next forward pass)
    ints: jax.Array  # the step's packed host arrays, in the resident buffers; sampling reads its parameters there
    floats: jax.Array  # (both donated to the next forward pass)
    features: SamplerFeatures
    prompt_outputs: tuple  # with prompt targets: their logprobs and top alternatives
    num_chunks: int
    num_tokens: int
    device_outputs: tuple = ()  # once sampled; still computing until collected
    index: int = 0  # the runner's count of launches before this one


@dataclasses.dataclass
class StepOutput:
    tokens: np.ndarray  # [n] int32
    logprobs: np.ndarray  # [n] float32, of the sampled tokens
    top_logprobs: np.ndarray  # [n, TOP_LOGPROBS] float32, best first
    top_ids: np.ndarray  # [n, TOP_LOGPROBS] int32
    ids_logprobs: np.ndarray  # [n, MAX_TOKEN_IDS_LOGPROB] float32: of each row's token_ids_logprob
    # With prompt targets, per token of the flat batch:
    prompt_logprobs: np.ndarray | None = None  # [T] float32: logprob of the token's target
    prompt_top_logprobs: np.ndarray | None = None  # [T, TOP_LOGPROBS]
    prompt_top_ids: np.ndarray | None = None  # [T, TOP_LOGPROBS]
    prompt_ids_logprobs: np.ndarray | None = None  # [T, MAX_TOKEN_IDS_LOGPROB]

    @classmethod
    def of(cls, handle: StepHandle) -> "StepOutput":
        """A launched step's results, waited for and brought to the host (sampling packs them in one array)."""
        n, (packed, *prompt_out) = handle.num_chunks, handle.device_outputs
        packed = np.asarray(packed)[:n]
        if packed.shape[1] > 2:
            k = (packed.shape[1] - 2 - MAX_TOKEN_IDS_LOGPROB) // 2  # TOP_LOGPROBS, or the vocabulary if smaller
            top_logprobs, top_ids = packed[:, 2:2 + k].view(np.float32), packed[:, 2 + k:2 + 2 * k]
            ids_logprobs = packed[:, 2 + 2 * k:].view(np.float32)
        else:  # the step's sampling did not compute them
            top_logprobs, top_ids = np.zeros((n, TOP_LOGPROBS), np.float32), np.zeros((n, TOP_LOGPROBS), np.int32)
            ids_logprobs = np.zeros((n, MAX_TOKEN_IDS_LOGPROB), np.float32)
        result = cls(packed[:, 0], packed[:, 1].view(np.float32), top_logprobs, top_ids, ids_logprobs)
        if prompt_out:
            (result.prompt_logprobs, result.prompt_top_logprobs, result.prompt_top_ids,
             result.prompt_ids_logprobs) = (np.asarray(x)[: handle.num_tokens] for x in prompt_out)
        return result
