"""Turns a stream of token ids into a stream of text, and finds stop strings.

A byte-level tokenizer can split one character over several tokens; text is released only once
the decoded tail is a whole character (no U+FFFD at its end). With stop strings, the last
`longest stop - 1` characters are held back so a stop string is never half-streamed. As in vLLM,
stop strings are looked for only once more than `min_tokens` tokens are out.
"""

from __future__ import annotations

from warmserve.controller.tokenizer import ModelTokenizer

PROMPT_CONTEXT_TOKENS = 5  # decoding starts with a few prompt tokens so spacing comes out right
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: ModelTokenizer,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stop_matched: str | None = None
        self.min_tokens = min_tokens
        self.num_output_tokens = 0

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _append(self, token_id: int, final: bool) -> None:
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT_CHAR)):
            self.text += new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)

    def add(self, token_ids: list[int], finished: bool = False) -> str:
        """Takes new tokens; returns the text that may be sent now. After a stop string matched,
        `stop_matched` is set, the text ends before it, and later tokens are ignored."""
        if self.stop_matched is not None:
            return ""
        searched_from = max(0, len(self.text) - self.holdback)
        for index, token_id in enumerate(token_ids):
            self._append(token_id, final=finished and index == len(token_ids) - 1)
        self.num_output_tokens += len(token_ids)
        if self.num_output_tokens > self.min_tokens:
            self._find_stop(searched_from)
        done = finished or self.stop_matched is not None
        end = len(self.text) if done or not self.stop else len(self.text) - self.holdback
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def _find_stop(self, start: int) -> None:
        best = None
        for stop in self.stop:
            index = self.text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is not None:
            self.text = self.text[: best[0]]
            self.stop_matched = best[1]
