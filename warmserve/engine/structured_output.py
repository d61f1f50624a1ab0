"""Structured output in the engine: each constrained request's grammar and matcher, the token
bitmask of a step, and the matchers' advance with the sampled tokens.

The grammar engine is xgrammar rather than llguidance because it gives what this engine needs
in one package: a CPU kernel and device-agnostic torch code to apply its packed bitmask (the
same format on CPU and GPU), a compiled-grammar cache in its GrammarCompiler (a schema that
comes back costs nothing), a batch matcher that fills many requests' masks with C++ threads,
and a TokenizerInfo built from a tokenizer.json's vocabulary and metadata, which the worker
has without loading transformers' tokenizer classes.

Where the time goes:
- Compiling starts when a request is added, on a thread of its own: the request waits out of
  the batch while the others keep stepping (a new schema takes ~0.1 s against a 150k-token
  vocabulary; one compiled before comes from the cache at once). A grammar that does not
  compile fails its request.
- Filling a step's bitmask runs on a background thread while the forward runs (on a GPU the
  forward is queued kernels, on the CPU it is torch ops that release the GIL); the logits
  wait for it only when the forward is done.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import xgrammar

from warmserve.config import StructuredOutput
from warmserve.engine.scheduler import Scheduler
from warmserve.engine.sequence import Sequence
from warmserve.layers.grammar import allocate_bitmask, apply_token_bitmask, unpack_bitmask

if TYPE_CHECKING:
    from warmserve.engine.engine import Engine

# How long a step with nothing else to run waits for a grammar being compiled (the worker's
# loop reads its commands between steps).
IDLE_COMPILE_WAIT_S = 0.02


# xgrammar's errors open with its log prefix: "[12:00:00] /project/cpp/file.cc:94: ".
_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")


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
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        message = _XGRAMMAR_LOG_PREFIX.sub("", lines[-1])
        raise GrammarError(f"{spec.field}: the {spec.kind} cannot be compiled: {message}") from None


class StructuredOutputs:
    """The constrained requests of one engine: those whose grammar is compiling, and the
    matchers of those that run."""

    def __init__(
        self,
        tokenizer_path: Path,
        vocab_size: int,
        stop_token_ids: tuple[int, ...],
        max_num_seqs: int,
        device: torch.device,
    ):
        self.compiler_key = (tokenizer_path, vocab_size, stop_token_ids)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.vocab_size = vocab_size
        self.compiling: dict[str, tuple[Sequence, Future]] = {}
        self.matchers: dict[str, xgrammar.GrammarMatcher] = {}
        self.bitmask = allocate_bitmask(max_num_seqs, vocab_size, device)
        self.batch_matcher = xgrammar.BatchGrammarMatcher()
        self.compiler_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self.filler = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    @classmethod
    def of(cls, engine: Engine, tokenizer_path: Path) -> StructuredOutputs:
        return cls(
            tokenizer_path,
            engine.vocab_size,
            tuple(sorted(engine.scheduler.eos_token_ids)),
            engine.scheduler.limits.max_num_seqs,
            engine.runner.device,
        )

    def add(self, seq: Sequence) -> None:
        """Starts compiling the sequence's grammar; `admit_compiled` schedules it once done."""
        future = self.compiler_thread.submit(self._compile, seq.params.structured_output)
        self.compiling[seq.request_id] = (seq, future)

    def _compile(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        # The compiler too is made here: building a large vocabulary's TokenizerInfo takes time.
        try:
            compiler = grammar_compiler(*self.compiler_key)
        except Exception as exc:  # the request fails, not the model
            raise GrammarError(
                f"{spec.field}: structured output is not available for this model's tokenizer "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return compile_grammar(compiler, spec)

    def admit_compiled(self, scheduler: Scheduler) -> list[tuple[str, str]]:
        """Hands the sequences whose grammar is compiled to `scheduler` (their matchers made);
        returns the request ids whose grammar failed, with why. With nothing else to run it
        waits a little for a grammar rather than let the worker's loop spin."""
        if not self.compiling:
            return []
        if not scheduler.has_unfinished():
            futures = [future for _, future in self.compiling.values()]
            wait(futures, timeout=IDLE_COMPILE_WAIT_S, return_when=FIRST_COMPLETED)
        failed = []
        for request_id, (seq, future) in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[request_id]
            try:
                self.matchers[request_id] = xgrammar.GrammarMatcher(future.result())
            except GrammarError as exc:
                failed.append((request_id, str(exc)))
            else:
                scheduler.add(seq)
        return failed

    def remove(self, request_id: str) -> None:
        entry = self.compiling.pop(request_id, None)
        if entry is not None:
            entry[1].cancel()
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
        """Advances each constrained sequence's matcher with its sampled token. A sequence is
        done when its grammar is: it took a stop token, or it is complete and allows nothing
        but a stop token (no step is spent on sampling that token), or it refused the token."""
        for seq, token in zip(seqs, tokens, strict=True):
            matcher = self.matchers.get(seq.request_id)
            if matcher is not None:
                seq.grammar_done = self._grammar_done(matcher, token)

    def _grammar_done(self, matcher: xgrammar.GrammarMatcher, token: int) -> bool:
        if not matcher.accept_token(token) or matcher.is_terminated():
            return True
        return matcher.is_completed() and self._only_stop_tokens_allowed(matcher)

    def _only_stop_tokens_allowed(self, matcher: xgrammar.GrammarMatcher) -> bool:
        row = xgrammar.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(row)
        allowed = unpack_bitmask(row[0], self.vocab_size).nonzero().flatten().tolist()
        return set(allowed) <= self.stop_token_ids

    def close(self) -> None:
        self.compiler_thread.shutdown(wait=True, cancel_futures=True)
        self.filler.shutdown(wait=True)
        self.compiling.clear()
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
