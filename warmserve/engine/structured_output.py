"""Structured output in the engine: each constrained request's grammar and matcher, the token
bitmask of a step, and the matchers' advance with the sampled tokens.

The grammar engine is xgrammar rather than llguidance because it gives what this engine needs
in one package: a CPU kernel and device-agnostic torch code to apply its packed bitmask (the
same format on CPU and GPU), a compiled-grammar cache in its GrammarCompiler (a schema that
comes back costs nothing), a batch matcher that fills many requests' masks with C++ threads,
and a TokenizerInfo built from a tokenizer.json's vocabulary and metadata, which the worker
has without loading transformers' tokenizer classes.

Where the time goes:
- Compiling happens when a request is added (cached per tokenizer and grammar; a few
  milliseconds for a typical schema), never inside a step, and a grammar that does not
  compile refuses the request there.
- Filling a step's bitmask runs on a background thread while the forward runs (on a GPU the
  forward is queued kernels, on the CPU it is torch ops that release the GIL); the logits
  wait for it only when the forward is done.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import xgrammar

from warmserve.config import StructuredOutput
from warmserve.engine.sequence import Sequence
from warmserve.layers.grammar import allocate_bitmask, apply_token_bitmask


class GrammarError(ValueError):
    """A request's grammar cannot be compiled (the message says why)."""


_compilers: dict[tuple, xgrammar.GrammarCompiler] = {}
_compilers_lock = threading.Lock()


def grammar_compiler(
    tokenizer_path: Path, vocab_size: int, stop_token_ids: tuple[int, ...]
) -> xgrammar.GrammarCompiler:
    """One compiler (and so one compiled-grammar cache) per tokenizer for the whole process:
    a model unloaded and loaded again keeps the grammars it compiled."""
    stat = tokenizer_path.stat()
    key = (str(tokenizer_path), stat.st_mtime_ns, stat.st_size, vocab_size, stop_token_ids)
    with _compilers_lock:
        compiler = _compilers.get(key)
        if compiler is None:
            info = tokenizer_info(tokenizer_path, vocab_size, stop_token_ids)
            compiler = _compilers[key] = xgrammar.GrammarCompiler(info)
        return compiler


def tokenizer_info(
    tokenizer_path: Path, vocab_size: int, stop_token_ids: tuple[int, ...]
) -> xgrammar.TokenizerInfo:
    """What xgrammar.TokenizerInfo.from_huggingface builds for a fast tokenizer, read from the
    same tokenizer.json. `vocab_size` is the model's (its logits' width), which may exceed the
    tokenizer's: ids without a token are never allowed."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    encoded_vocab = [""] * vocab_size
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size:
            encoded_vocab[token_id] = token
    metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())
    return xgrammar.TokenizerInfo(
        encoded_vocab,
        metadata["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids) or None,
        add_prefix_space=metadata["add_prefix_space"],
    )


def compile_grammar(
    compiler: xgrammar.GrammarCompiler, spec: StructuredOutput
) -> xgrammar.CompiledGrammar:
    try:
        if spec.kind == "json_schema":
            # No free whitespace between tokens: a model is not led into emitting it forever.
            return compiler.compile_json_schema(spec.spec, any_whitespace=False)
        if spec.kind == "json_object":
            return compiler.compile_json_schema(
                '{"type": "object"}', any_whitespace=False, strict_mode=False
            )
        if spec.kind == "regex":
            return compiler.compile_regex(spec.spec)
        choices = json.loads(spec.spec)
        literals = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
        return compiler.compile_grammar(f"root ::= {literals}")
    except (RuntimeError, ValueError) as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise GrammarError(f"the {spec.kind} cannot be compiled: {message}") from None


class StructuredOutputs:
    """The constrained requests of one engine."""

    def __init__(
        self,
        tokenizer_path: Path,
        vocab_size: int,
        stop_token_ids: tuple[int, ...],
        max_num_seqs: int,
        device: torch.device,
    ):
        self.compiler = grammar_compiler(tokenizer_path, vocab_size, stop_token_ids)
        self.matchers: dict[str, xgrammar.GrammarMatcher] = {}
        self.bitmask = allocate_bitmask(max_num_seqs, vocab_size, device)
        self.batch_matcher = xgrammar.BatchGrammarMatcher()
        self.filler = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    def add(self, request_id: str, spec: StructuredOutput) -> None:
        self.matchers[request_id] = xgrammar.GrammarMatcher(compile_grammar(self.compiler, spec))

    def remove(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)

    def start_masks(self, seqs: list[Sequence]) -> PendingMasks | None:
        """Starts filling the bitmask rows of the constrained sequences among `seqs` (row i is
        seqs[i]); None when none is constrained."""
        rows = [i for i, seq in enumerate(seqs) if seq.request_id in self.matchers]
        if not rows:
            return None
        matchers = [self.matchers[seqs[i].request_id] for i in rows]
        filled = self.filler.submit(
            self.batch_matcher.batch_fill_next_token_bitmask, matchers, self.bitmask, rows
        )
        return PendingMasks(self.bitmask, rows, filled)

    def accept(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Advances each constrained sequence's matcher with its sampled token; a sequence whose
        grammar is complete (it took a stop token) or refused the token is done."""
        for seq, token in zip(seqs, tokens, strict=True):
            matcher = self.matchers.get(seq.request_id)
            if matcher is not None and (not matcher.accept_token(token) or matcher.is_terminated()):
                seq.grammar_done = True

    def close(self) -> None:
        self.filler.shutdown(wait=True)
        self.matchers.clear()


class PendingMasks:
    """A step's bitmask being filled while the forward runs."""

    def __init__(self, bitmask: torch.Tensor, rows: list[int], filled: Future):
        self.bitmask = bitmask
        self.rows = rows
        self.filled = filled

    def apply(self, logits: torch.Tensor) -> None:
        self.filled.result()
        apply_token_bitmask(logits, self.bitmask, self.rows)
