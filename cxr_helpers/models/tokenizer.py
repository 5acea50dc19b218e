"""SD1.5's CLIP tokenizer: rebuilt offline from the BPE merges shipped in this package (so token
counts offline equal those on Kaggle), written in the tokenizer folder's layout, and loaded from
a diffusers model (hub id or folder) or a tokenizer folder."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..config.stages import CLIP_MAX_TOKENS
from ..core.errors import CxrError
from .hub import from_hub, is_local
from ..core.files import write_json, write_text
from ..config.presets import SD15_MODEL_ID

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character map (as in OpenAI's CLIP tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """SD1.5's CLIP BPE vocabulary, rebuilt from the merges shipped in this package.

    The merges are the first 48,894 of OpenAI CLIP's `bpe_simple_vocab_16e6.txt` (MIT); the
    vocabulary is the 256 byte characters, the same with `</w>`, one token per merge, then the
    start and end tokens: 49,408 ids, exactly SD1.5's tokenizer.
    """
    raw = resources.files("cxr_helpers").joinpath("assets/clip_bpe_merges.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1:]
    merges = [m for m in merges if m][: CLIP_VOCAB_SIZE - 512 - 2]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write SD1.5's CLIP tokenizer (vocab.json, merges.txt and configs) into `out_dir`."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    # vocab.json + merges.txt: the files SD1.5's own tokenizer folder has, readable by any
    # transformers version; save_pretrained adds tokenizer.json for the fast backend.
    write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"),
        model_max_length=CLIP_MAX_TOKENS, pad_token=CLIP_EOS,
    )
    tokenizer.save_pretrained(out_dir)
    write_json(out_dir / "special_tokens_map.json", {
        "bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS,
    })
    return out_dir


def load_tokenizer(model: str | Path):
    """The CLIP tokenizer of a diffusers model (hub id or local dir), or a tokenizer dir."""
    from transformers import CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "sequence length is longer than..." is our job to report
    model = str(model)
    if is_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise CxrError(f"tokenizer {model!r} is not a directory; pass a diffusers model dir, "
                           f"a tokenizer dir, or a hub id such as {SD15_MODEL_ID}")
        folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        if not any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise CxrError(f"{folder} holds no tokenizer (vocab.json or tokenizer.json); pass a "
                           "diffusers model dir (with a tokenizer/ folder) or a tokenizer dir")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # transformers raises OSError, ValueError, TypeError...
            raise CxrError(f"could not load a CLIP tokenizer from {folder} ({exc.__class__.__name__}); "
                           "it needs vocab.json and merges.txt or tokenizer.json") from None
        return _check_tokenizer(tokenizer, str(folder))
    def load_checked(name, **kwargs):
        return _check_tokenizer(CLIPTokenizer.from_pretrained(name, **kwargs), name)

    return from_hub(load_checked, model, "tokenizer", subfolder="tokenizer")


def _check_tokenizer(tokenizer, source: str):
    # transformers 5 can build a CLIP tokenizer with an empty vocabulary when files are
    # missing; that would silently miscount every prompt.
    if len(tokenizer) < 1000 or tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise CxrError(f"the tokenizer from {source} has {len(tokenizer)} tokens and no start/end "
                       "tokens; point at a diffusers model's folder or its tokenizer folder")
    return tokenizer
