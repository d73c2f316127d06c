"""Constraints a request may carry, compiled by llguidance into token matchers (one compile per grammar).

Why llguidance rather than xgrammar: both compute a token bitmask in tens of microseconds, but
llguidance has no torch dependency (one abi3 wheel for every Python version, which matters for the
device images), takes regex, JSON schema and Lark/GBNF grammars through one API, names the problem in
its errors, and computes the forced ("fast-forward") tokens that jump-forward needs, withholding a last
token that could still merge with the text after it, so the forced tokens are always the tokenizer's
own tokenization.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading

import llguidance
import llguidance.hf

KINDS = ("regex", "json_schema", "ebnf", "choices")


@dataclasses.dataclass(frozen=True)
class Constraint:
    kind: str  # one of KINDS
    spec: str  # the regex, schema (JSON text), grammar, or JSON list of the choices

    @classmethod
    def from_params(cls, regex=None, json_schema=None, ebnf=None, choices=None) -> "Constraint | None":
        """The one constraint given (raises ValueError for several, or a value of the wrong type)."""
        given = {k: v for k, v in zip(KINDS, (regex, json_schema, ebnf, choices)) if v is not None}
        if not given:
            return None
        if len(given) > 1:
            raise ValueError(f"give at most one of regex, json_schema, ebnf and choices; got {sorted(given)}")
        (kind, value), = given.items()
        if kind == "json_schema":
            if isinstance(value, str):
                try:
                    json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"json_schema is not valid JSON: {e}") from None
            elif isinstance(value, (dict, bool)):
                value = json.dumps(value)
            else:
                raise ValueError("json_schema must be a JSON schema (an object, or its JSON text)")
        elif kind == "choices":
            if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
                raise ValueError("choices must be a non-empty list of non-empty strings")
            value = json.dumps(value)
        elif not isinstance(value, str) or not value:
            raise ValueError(f"{kind} must be a non-empty string")
        return cls(kind, value)

    def to_llguidance(self) -> str:
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "json_schema":
            # Compact JSON (no free whitespace): a small model's free whitespace could run forever.
            return llguidance.LLMatcher.grammar_from_json_schema(
                self.spec, defaults={"whitespace_flexible": False})
        if self.kind == "ebnf":
            try:
                return llguidance.grammar_from("ebnf", self.spec)
            except ValueError as e:
                raise ValueError(f"invalid ebnf grammar: {e}") from None
        return llguidance.grammar_from("choice", self.spec)


class GrammarCompiler:
    """Compiles constraints against one tokenizer; keeps the most recent compiled grammars."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: set[int], cache_size: int = 256):
        eos = sorted(eos_token_ids) or None
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.executor = llguidance.LLExecutor()  # fills many rows of the bitmask in parallel
        self._compiled: collections.OrderedDict[Constraint, llguidance.LLMatcher] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the grammar (raises ValueError naming what is wrong)."""
        with self._lock:
            template = self._compiled.get(constraint)
            if template is not None:
                self._compiled.move_to_end(constraint)
                return template.deep_copy()
        template = llguidance.LLMatcher(self.tokenizer, constraint.to_llguidance(), log_level=0)
        if template.is_error():
            raise ValueError(f"invalid {constraint.kind}: {template.get_error().strip()}")
        with self._lock:
            self._compiled[constraint] = template
            if len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return template.deep_copy()
