"""How large a user's input may be: each bound is refused in one sentence before any work or
memory is spent on it (a spec asking for a billion images grew to 22 GB and was killed with no
message; a 50 MB prompt aborted the process half-way; JSON nested 100,000 deep ended in a
RecursionError). The bounds are far above any real use, so only a mistake meets them.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import CxrError

# A prompt: CLIP reads 77 tokens (a radiology impression is a few hundred bytes); past this the
# text is a file pasted in by mistake, and tokenizing it alone takes minutes.
MAX_PROMPT_BYTES = 4096
# A prompts file: 100,000 prompts of 300 bytes are 30 MB.
MAX_PROMPTS_FILE_BYTES = 64 << 20
# Images one run may ask for (prompts x images per prompt, or a spec's counts together); the IU
# collection holds 7,466 films, SD1.5's evaluation sets 2 x 2,912.
MAX_IMAGES_PER_RUN = 1_000_000
# A JSON file a user wrote (a spec, a saved config, the Kaggle manifest).
MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 32
# A film: the IU PNGs are about 2,000 px a side (4 M pixels); decoding is refused above this
# (~ 6,300 px a side), before the pixels are read (Pillow's own guard is 179 M).
MAX_FILM_PIXELS = 40_000_000


def check_prompt_sizes(prompts: list[str], where: str) -> None:
    """Each prompt at most MAX_PROMPT_BYTES of UTF-8."""
    for i, prompt in enumerate(prompts, 1):
        size = len(prompt.encode("utf-8", "surrogatepass"))
        if size > MAX_PROMPT_BYTES:
            raise CxrError(f"{where}: prompt {i} is {size:,} bytes, over the {MAX_PROMPT_BYTES:,}-byte bound (CLIP "
                           "reads 77 tokens, a few hundred bytes); shorten it")


def check_image_count(count: int, where: str) -> None:
    if count > MAX_IMAGES_PER_RUN:
        raise CxrError(f"{where} asks for {count:,} images, over the {MAX_IMAGES_PER_RUN:,} one run may make; "
                       "ask for fewer, or split the work into several runs")


def check_file_size(path: str | os.PathLike, limit: int, what: str) -> None:
    size = os.path.getsize(path)
    if size > limit:
        raise CxrError(f"{what} {path} is {size / 2**20:,.1f} MiB, over the {limit >> 20} MiB bound; "
                       "pass a smaller file")


def json_depth(obj: Any) -> int:
    """How deeply lists and objects nest in `obj` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def film_may_be_decoded(width: int, height: int) -> bool:
    """Whether a film of this size may be decoded."""
    return width * height <= MAX_FILM_PIXELS
