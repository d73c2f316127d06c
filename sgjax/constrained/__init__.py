"""Structured generation: regex / JSON schema / EBNF / choices constraints as token bitmasks."""

from sgjax.constrained.grammar import KINDS, Constraint, GrammarCompiler

__all__ = ["KINDS", "Constraint", "GrammarCompiler"]
