"""Counting tokens: each request is tokenized once here, and those same ids feed the model and
the bill. Input tokens = the ids the model receives ([CLS] and [SEP] included) summed over
texts; output tokens = the label text's tokens without special tokens. Knows no prices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from serving.tokenization import load_tokenizer


class InputError(Exception):
    """A text the endpoint refuses: `kind` is "invalid" or "too_long" (serving.billing's
    refusal kinds), with a stable error code."""

    def __init__(self, kind: str, code: str, message: str):
        super().__init__(message)
        self.kind, self.code, self.message = kind, code, message


@dataclass
class Metered:
    ids: List[List[int]]
    input_tokens: int
    truncated: int  # how many texts were cut to the model's maximum


class Meter:
    """One tokenizer whose settings never change after construction.

    HF fast tokenizers raise "Already borrowed" when threads change truncation settings
    concurrently, so truncation is done on the ids here instead of by the tokenizer.
    """

    def __init__(self, tokenizer_file: Path, max_tokens: int, labels: Dict[int, str]):
        self.max_tokens = max_tokens
        self.tokenizer = load_tokenizer(tokenizer_file, max_tokens)
        self.tokenizer.no_truncation()
        self.label_tokens = {i: self.count_plain(name) for i, name in labels.items()}

    def count_plain(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def meter(self, texts: Sequence[str], truncate: bool) -> Metered:
        # One text: `encode`, which keeps the GIL. `encode_batch` releases it to run on Rayon's
        # threads and must win it back from the model thread afterwards: 3x the time of the
        # encoding itself on the event loop at concurrency 32 (py-spy).
        encodings = ([self.tokenizer.encode(texts[0])] if len(texts) == 1
                     else self.tokenizer.encode_batch(list(texts)))
        ids, truncated = [], 0
        for n, enc in enumerate(encodings):
            row = list(enc.ids)
            # Content tokens exclude the special tokens the post-processor added; zero
            # means the text was only whitespace/control characters after normalisation.
            if sum(1 for s in enc.special_tokens_mask if not s) == 0:
                raise InputError("invalid", "empty_text",
                                 f"text {n} has no tokens after normalisation")
            if len(row) > self.max_tokens:
                if not truncate:
                    raise InputError(
                        "too_long", "input_too_long",
                        f"text {n} is {len(row)} tokens; the model takes at most "
                        f"{self.max_tokens} (send \"truncate\": true to cut and bill the cut)")
                # Same result as the tokenizer's own truncation: keep the head, end on [SEP].
                row = row[: self.max_tokens - 1] + row[-1:]
                truncated += 1
            ids.append(row)
        return Metered(ids=ids, input_tokens=sum(len(r) for r in ids), truncated=truncated)

    def output_tokens(self, label_ids: Sequence[int]) -> int:
        return sum(self.label_tokens[i] for i in label_ids)

    @property
    def max_output_tokens_per_text(self) -> int:
        return max(self.label_tokens.values())
