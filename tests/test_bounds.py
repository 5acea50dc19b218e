"""Inputs past the declared bounds (core/bounds.py) are refused in one sentence before any work,
and inputs just inside them are taken; a non-ASCII prompt runs under an ASCII locale."""

import json
import os
import struct
import subprocess
import sys
import zlib

import pandas as pd
import pytest

from cxr_helpers.__main__ import utf8_arguments
from cxr_helpers.config.stages import SampleConfig, stage_config
from cxr_helpers.core import bounds
from cxr_helpers.core.errors import CxrError
from cxr_helpers.core.files import read_user_json
from cxr_helpers.sampling import synthesize as synthesize_mod
from cxr_helpers.sampling.stage import read_prompts, sample
from test_data import make_dataset, run


def spec_with(tmp_path, **item):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"items": [{"prompt": "Cardiomegaly.", "count": 1, **item}]}))
    return path


def test_a_spec_asking_for_a_billion_images_is_refused_before_anything_is_made(tmp_path):
    with pytest.raises(CxrError, match="asks for 1,000,000,000 images, over the 1,000,000 one run may make"):
        synthesize_mod.synthesize(spec_with(tmp_path, count=10**9), tmp_path / "out", model="unused")
    assert not (tmp_path / "out").exists()
    # The counts add up across items; at the bound itself the spec is taken.
    spec = {"items": [{"prompt": "a", "count": bounds.MAX_IMAGES_PER_RUN // 2}] * 2}
    assert synthesize_mod.check_spec(spec) is spec
    spec["items"].append({"prompt": "b", "count": 1})
    with pytest.raises(CxrError, match="asks for 1,000,001 images"):
        synthesize_mod.check_spec(spec)


def test_a_huge_prompt_is_refused_before_the_folder_is_made(tmp_path):
    huge = "x" * (50 << 20)  # 50 MB
    cfg = stage_config(SampleConfig, model="unused", out=str(tmp_path / "s"), prompts=["Normal.", huge])
    with pytest.raises(CxrError, match="sample: prompt 2 is 52,428,800 bytes, over the 4,096-byte bound"):
        sample(cfg)
    assert not (tmp_path / "s").exists()
    at_bound = "é" * (bounds.MAX_PROMPT_BYTES // 2)  # counted in UTF-8 bytes, not characters
    assert read_prompts(stage_config(SampleConfig, prompts=[at_bound])) == [at_bound]
    with pytest.raises(CxrError, match="prompt 1 is 4,098 bytes"):
        read_prompts(stage_config(SampleConfig, prompts=[at_bound + "é"]))
    with pytest.raises(CxrError, match="spec .*prompt 1 is"):
        synthesize_mod.check_spec({"items": [{"label": "x", "templates": [huge], "count": 1}]})


def test_images_per_prompt_times_prompts_is_bounded(tmp_path):
    with pytest.raises(CxrError, match="sample asks for 20,000,000 images"):
        read_prompts(stage_config(SampleConfig, prompts=["a", "b"], n_per_prompt=10**7))


def test_a_huge_prompt_file_is_refused_unread(tmp_path):
    path = tmp_path / "prompts.txt"
    with open(path, "wb") as handle:  # sparse: 65 MiB on paper, nothing on disk
        handle.truncate(bounds.MAX_PROMPTS_FILE_BYTES + (1 << 20))
    with pytest.raises(CxrError, match="prompt file .* is 65.0 MiB, over the 64 MiB bound"):
        read_prompts(stage_config(SampleConfig, prompts_file=str(path)))


@pytest.mark.parametrize("depth", [33, 100_000])
def test_json_nested_past_the_bound_is_one_sentence(tmp_path, depth):
    path = tmp_path / "spec.json"
    path.write_text('{"items": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(CxrError, match="nests lists or objects more than 32 deep"):
        synthesize_mod.read_spec(path)
    path.write_text('{"items": ' + "[" * 31 + "]" * 31 + "}")  # 32 deep with the object: read, then checked
    with pytest.raises(CxrError, match="spec item 1 must be an object"):
        synthesize_mod.read_spec(path)


def test_a_json_file_past_its_size_bound_is_refused_unread(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as handle:
        handle.truncate(bounds.MAX_JSON_BYTES + 1)
    with pytest.raises(CxrError, match="spec .* is 16.0 MiB, over the 16 MiB bound"):
        read_user_json(path, "spec", "")


def png_header(width, height):
    """A valid PNG claiming width x height px, with almost no pixel data (nothing is decoded)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def test_a_film_over_the_pixel_bound_is_excluded_never_decoded(tmp_path, tokenizer):
    root = make_dataset(tmp_path / "d", ["Normal chest."] * 3, views=("Frontal",))
    films = root / "images" / "images_normalized"
    # 8,000 x 6,000 = 48 M pixels: below Pillow's own guard (89 M warns, 179 M refuses), above ours.
    (films / "1_IM-0001-4001.dcm.png").write_bytes(png_header(8000, 6000))
    (films / "2_IM-0002-4001.dcm.png").write_bytes(png_header(6000, 6000))  # 36 M: inside the bound
    result = run(root, tmp_path / "out", tokenizer, test_fraction=0.5)
    reasons = result.excluded.set_index("uid")["reason"]
    assert reasons[1] == "oversized_image" and 2 not in reasons.index
    assert result.summary["excluded_by_reason"]["oversized_image"] == 1


def test_arguments_are_read_as_utf8_whatever_the_locale():
    as_c_locale = "Épanchement".encode().decode("ascii", "surrogateescape")  # what Python makes of argv under LANG=C
    assert as_c_locale != "Épanchement" and utf8_arguments([as_c_locale]) == ["Épanchement"]
    with pytest.raises(CxrError, match="is not UTF-8 text"):
        utf8_arguments([b"\xe9panchement".decode("ascii", "surrogateescape")])  # Latin-1 bytes


def test_a_non_ascii_prompt_runs_under_an_ascii_locale(tmp_path, tiny_model_dir):
    prompt = "Épanchement pleural — droit."
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONUTF8", "PYTHONIOENCODING"))}
    done = subprocess.run([sys.executable, "-m", "cxr_helpers", "sample", "--model", str(tiny_model_dir),
                           "--prompt", prompt, "--steps", "1", "--resolution", "64", "--out", str(tmp_path / "s")],
                          capture_output=True, env={**env, "LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0",
                                                    "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")[-2000:]
    assert pd.read_csv(tmp_path / "s" / "metadata.csv")["prompt"].tolist() == [prompt]
