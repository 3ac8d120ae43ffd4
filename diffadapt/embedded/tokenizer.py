"""An offline CLIPTokenizer whose words are the world's words (see docs/design.md, "Working offline").

The files follow CLIP's byte-level BPE format: ``vocab.json`` holds the 256 byte symbols, the
same with ``</w>``, one symbol per learned merge and the two special tokens; ``merges.txt``
holds merges learned on the word list, so every listed word (``world.WORDS``, the trigger
``sks`` included) is one token. Any other text still tokenizes, into byte symbols, never unk.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from diffadapt.embedded.world import WORDS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """CLIP / GPT-2 ``bytes_to_unicode``: 256 printable stand-ins for the 256 bytes, in order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def learn_merges(words) -> list[tuple[str, str]]:
    """Plain BPE training on distinct words until each is one symbol (ties broken alphabetically)."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words)) if w]
    merges = []
    while True:
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out


def write_tokenizer_files(directory: str, words=None, model_max_length: int = 77) -> str:
    """Write vocab.json, merges.txt and tokenizer_config.json for ``CLIPTokenizer.from_pretrained``."""
    if words is None:
        words = WORDS
    merges = learn_merges(w.lower() for w in words)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return directory


def build_tokenizer(directory: str | None = None, words=None, model_max_length: int = 77):
    """A ``CLIPTokenizer`` for the world's words, written to ``directory`` (a temp dir if None)."""
    import tempfile

    from transformers import CLIPTokenizer

    if directory is None:
        directory = tempfile.mkdtemp(prefix="diffadapt-tok-")
    write_tokenizer_files(directory, words, model_max_length)
    return CLIPTokenizer.from_pretrained(directory)
