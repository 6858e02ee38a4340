"""Stage `tokenizer`: train a BERT WordPiece vocabulary on the train split (or copy a
pretrained one), save it loadable by `transformers.BertTokenizerFast`, report [UNK] rate
and token lengths.

The files written here are the billing unit of the endpoint: the model is trained on,
exported with, and metered by exactly this tokenizer. Writes `build/tokenizer/` and
`metrics/tokenizer.json`; knows nothing about models.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from pipeline import paths
from pipeline.errors import fail, require, run_stage
from pipeline.io import read_jsonl, write_json
from pipeline.params import Tokenizer as TokenizerParams
from pipeline.params import load
from pipeline.prepare import percentiles
from serving.errors import first_line

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Files that travel with the model (export copies them; serving loads tokenizer.json).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def build_vocab(texts: Sequence[str], p: TokenizerParams) -> List[str]:
    """A deterministic WordPiece vocabulary learned from the texts' word counts.

    Words come from BERT's own normaliser and pre-tokenizer (HF tokenizers), which make
    every CJK character a word. The vocabulary is: special tokens; the `limit_alphabet`
    most frequent characters; a `##` continuation piece for every non-CJK character seen
    inside a word (so any word can be spelled); then whole words seen >= `min_frequency`
    times, most frequent first, until `vocab_size`. Ties break on the word itself.

    Why not `WordPieceTrainer`: its merges break frequency ties in hash-map order, so two
    runs on the same data give different vocabularies (seen here: ~1,300 ids moved), and
    the same data would no longer give the same model.
    """
    from tokenizers import pre_tokenizers

    norm = normalizer(p)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars: Counter = Counter()
    inner: set = set()
    for word, n in words.items():
        for i, ch in enumerate(word):
            chars[ch] += n
            if i and not _is_cjk(ch):
                inner.add(ch)

    def by_count(counter: Counter) -> List[str]:
        return [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]

    alphabet = by_count(chars)[: p.limit_alphabet]
    vocab = list(SPECIAL_TOKENS) + alphabet
    vocab += sorted("##" + ch for ch in inner if ch in set(alphabet))
    seen = set(vocab)
    for word in by_count(Counter({w: n for w, n in words.items()
                                  if n >= p.min_frequency and len(word) > 1})):
        if len(vocab) >= p.vocab_size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def normalizer(p: TokenizerParams):
    """BERT's normaliser, after NFKC with `tokenizer.nfkc`: reviews mix full-width and
    half-width forms (，/, ！/! ＸＰ/XP) that mean the same and would be different tokens."""
    from tokenizers import normalizers

    bert = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                      strip_accents=None, lowercase=p.lowercase)
    return normalizers.Sequence([normalizers.NFKC(), bert]) if p.nfkc else bert


def train_wordpiece(texts: Sequence[str], p: TokenizerParams):
    """BERT normalisation, every CJK character its own token, as bert-base-chinese does."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordPiece
    from tokenizers.processors import TemplateProcessing

    vocab = {token: i for i, token in enumerate(build_vocab(texts, p))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                              max_input_chars_per_word=100))
    tok.normalizer = normalizer(p)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    # BERT's [CLS] ... [SEP]: the ids counted for billing are the ids the model sees.
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


def save_for_transformers(raw_tokenizer, out_dir: Path, max_length: int = 512) -> None:
    """Write tokenizer.json + vocab.txt + configs so BertTokenizerFast.from_pretrained works."""
    from transformers import BertTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    raw_tokenizer.save(str(out_dir / "tokenizer.json"))
    vocab = sorted(raw_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (out_dir / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    fast = BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"),
                             tokenizer_file=str(out_dir / "tokenizer.json"),
                             model_max_length=max_length)
    fast.save_pretrained(str(out_dir))


def load_pretrained(name: str, out_dir: Path) -> None:
    from transformers import BertTokenizerFast

    try:
        fast = BertTokenizerFast.from_pretrained(name)
    except Exception as exc:  # OSError, ValueError, HTTP errors: all mean "cannot load it"
        fail(f"tokenizer.pretrained: cannot load '{name}' (not a local tokenizer dir, and the "
             f"hub is unreachable or has no such name; set TOKENMETER_ONLINE=1 for hub access): "
             f"{first_line(exc)[:200]}")
    fast.save_pretrained(str(out_dir))


def length_report(lengths: Sequence[int], thresholds: Sequence[int]) -> Dict[str, float]:
    arr = np.asarray(lengths)
    out = percentiles(lengths)
    for t in thresholds:
        out[f"share_over_{t}"] = round(float((arr > t).mean()), 6)
    return out


def report(tokenizer_file: Path, splits: Dict[str, List[str]], thresholds: Sequence[int]) -> dict:
    """[UNK] share of non-special tokens and token lengths ([CLS]/[SEP] included)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    unk_id = tok.token_to_id("[UNK]")
    out: dict = {"vocab_size": tok.get_vocab_size(), "splits": {}}
    for name, texts in splits.items():
        encodings = tok.encode_batch(texts)
        lengths = [len(e.ids) for e in encodings]
        unk = sum(e.ids.count(unk_id) for e in encodings)
        specials = sum(sum(e.special_tokens_mask) for e in encodings)
        out["splits"][name] = {
            "unk_rate": round(unk / max(1, sum(lengths) - specials), 6),
            "tokens": length_report(lengths, thresholds),
        }
    return out


def main() -> None:
    p = load(TokenizerParams)
    require(*(paths.split_file(s) for s in paths.SPLITS))
    splits = {s: [r["text"] for r in read_jsonl(paths.split_file(s))] for s in paths.SPLITS}
    if not splits["train"]:
        fail(f"{paths.split_file('train')} is empty; run the prepare stage first")
    out_dir = paths.TOKENIZER_DIR
    if p.pretrained:
        load_pretrained(p.pretrained, out_dir)
    else:
        save_for_transformers(train_wordpiece(splits["train"], p), out_dir)
    rep = report(out_dir / "tokenizer.json", splits, p.report_lengths)
    write_json(paths.metrics_file("tokenizer"), rep)
    t = rep["splits"]["train"]
    print(f"tokenizer: vocab {rep['vocab_size']}, [UNK] rate train {t['unk_rate']:.4%} / "
          f"test {rep['splits']['test']['unk_rate']:.4%}, tokens p50 {t['tokens']['p50']:.0f} "
          f"p95 {t['tokens']['p95']:.0f} max {t['tokens']['max']}")


if __name__ == "__main__":
    run_stage("tokenizer", main)
