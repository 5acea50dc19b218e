"""Caches that check themselves: every cache (resized images, the training encodings, the real
images' features) reads an entry only when it is whole and made from the same inputs. Each kind of
damage below is remade with one log line and gives the result a fresh cache gives; an intact
entry is read as it is (the control: nothing is remade, nothing is logged)."""

import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cxr_helpers.core import cache_entries
from cxr_helpers.core.layout import contained_image_path
from cxr_helpers.data import image_cache
from cxr_helpers.data.dataset import ChestXrayDataset


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path, where=-40):
    data = bytearray(path.read_bytes())
    data[where] ^= 0x55
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- safetensors entries --------

def damage_tensor_entry(kind, path, other):
    if kind == "truncated":
        truncate(path)
    elif kind == "flipped byte":
        flip_a_byte(path)
    elif kind == "foreign":  # a whole, valid entry made for other inputs, copied over this one
        shutil.copyfile(other, path)
    elif kind == "not safetensors":
        path.write_bytes(b"\x89PNG\r\n\x1a\n not a tensor file")
    elif kind == "unchecked":  # written without the key and digest (an older version's entry)
        from safetensors.torch import save_file

        save_file({"pool": torch.zeros(3, 4), "logits": torch.zeros(3, 0)}, str(path))


TENSOR_DAMAGE = ["truncated", "flipped byte", "foreign", "not safetensors", "unchecked"]


@pytest.mark.parametrize("kind", TENSOR_DAMAGE)
def test_a_damaged_tensor_entry_is_refused_with_a_line(kind, tmp_path, caplog):
    good = {"pool": torch.randn(3, 4), "logits": torch.randn(3, 2)}
    path = cache_entries.write_entry(tmp_path / "entry.safetensors", good, "key-a")
    other = cache_entries.write_entry(tmp_path / "other.safetensors", {"pool": torch.randn(3, 4)}, "key-b")
    damage_tensor_entry(kind, path, other)
    with caplog.at_level(logging.WARNING, logger=cache_entries.__name__):
        assert cache_entries.read_entry(path, "key-a", rows={"pool": 3}) is None
    assert len(caplog.records) == 1 and "recomputing" in caplog.text and str(path) in caplog.text


def test_an_intact_tensor_entry_is_read_as_written_and_the_wrong_size_is_not(tmp_path, caplog):
    good = {"pool": torch.randn(3, 4), "logits": torch.zeros(3, 0), "half": torch.ones(2, dtype=torch.bfloat16)}
    path = cache_entries.write_entry(tmp_path / "entry.safetensors", good, "key-a")
    with caplog.at_level(logging.WARNING):
        read = cache_entries.read_entry(path, "key-a", rows={"pool": 3})
    assert caplog.records == [] and all(torch.equal(read[k], good[k]) for k in good)
    assert cache_entries.read_entry(path, "key-a", rows={"pool": 4}) is None  # made for another image count
    assert cache_entries.read_entry(tmp_path / "absent.safetensors", "key-a") is None


def test_the_feature_cache_remakes_a_damaged_entry(pairs_csv, synth_dir, tmp_path, caplog):
    from cxr_helpers.evaluation.embeddings import cached_embed
    from cxr_helpers.evaluation.features import StandInFeatures
    from cxr_helpers.evaluation.image_sets import ImageSet

    net = StandInFeatures(0)
    images = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    real = ImageSet("real", images, ["p"] * 6, [f"{i}.png" for i in range(6)])
    pool, logits, hit = cached_embed(net, real, tmp_path, 4, False)
    assert hit is None
    _, _, hit = cached_embed(net, real, tmp_path, 4, False)
    assert hit is not None  # the control: an intact entry is read
    entry = tmp_path / hit
    for kind in TENSOR_DAMAGE:
        other = cache_entries.write_entry(tmp_path / "other.safetensors", {"pool": torch.randn(6, 64)}, "x")
        damage_tensor_entry(kind, entry, other)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again, again_logits, hit = cached_embed(net, real, tmp_path, 4, False)
        assert hit is None and torch.equal(again, pool) and torch.equal(again_logits, logits), kind
        assert "recomputing" in caplog.text, kind
        assert cached_embed(net, real, tmp_path, 4, False)[2] is not None, kind  # written whole again


def test_the_encodings_cache_remakes_a_damaged_entry(pairs_csv, synth_dir, tiny_model_dir, tmp_path, caplog):
    from cxr_helpers.config.stages import TrainConfig, stage_config
    from cxr_helpers.training.stage import train

    def run(name):
        cfg = stage_config(TrainConfig, pairs=str(pairs_csv), data_dir=str(synth_dir), model=str(tiny_model_dir),
                           out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), batch_size=2, max_steps=1,
                           checkpoint_every=0, validation_every=0, validation_prompts=())
        return train(cfg, progress=False)

    first = run("a")
    entry = next((tmp_path / "cache").glob("encodings-*.safetensors"))
    fresh = {k: v.clone() for k, v in load_file(str(entry)).items()}  # load_file maps the file: copy it
    assert run("b").encodings_hit  # the control
    flip_a_byte(entry)
    with caplog.at_level(logging.WARNING):
        third = run("c")
    assert not third.encodings_hit and "recomputing" in caplog.text
    remade = load_file(str(entry))
    assert remade.keys() == fresh.keys() and all(torch.equal(remade[k], fresh[k]) for k in fresh)  # the same tensors
    assert third.loss["loss"].tolist() == first.loss["loss"].tolist()


# ---------------------------------------------------------------- resized-image entries ------

def damage_image_entry(kind, path, other):
    if kind == "truncated":
        truncate(path)
    elif kind == "foreign":  # another film's whole entry copied over this one (the FID 0.03 -> 9.3 case)
        shutil.copyfile(other, path)
    elif kind == "wrong size":
        Image.new("L", (16, 16), 128).save(path)
    elif kind == "plain png":  # right size, no record of what it was made from
        Image.new("L", (64, 64), 128).save(path)
    elif kind == "edited pixels":  # its own record kept, pixels changed
        with Image.open(path) as im:
            text = dict(im.text)
            pixels = np.asarray(im).copy()
        pixels[:8] = 255 - pixels[:8]
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
        Image.fromarray(pixels, "L").save(path, pnginfo=info)
    elif kind == "not an image":
        path.write_bytes(b"nothing")


IMAGE_DAMAGE = ["truncated", "foreign", "wrong size", "plain png", "edited pixels", "not an image"]


def test_the_image_cache_remakes_every_damaged_entry_and_reads_intact_ones(pairs_csv, synth_dir, tmp_path, caplog,
                                                                         monkeypatch):
    pairs = pd.read_csv(pairs_csv).head(len(IMAGE_DAMAGE) + 1)
    fresh = ChestXrayDataset(pairs, synth_dir, 64, cache_dir=tmp_path / "cache")
    fresh.warm_cache(progress=False)
    expected = [np.asarray(fresh.load_image(i)) for i in range(len(pairs))]
    entries = [fresh.cache.path_for(contained_image_path(synth_dir, name)) for name in pairs["filename"]]
    for kind, entry in zip(IMAGE_DAMAGE, entries, strict=False):  # the last entry stays intact: the control
        damage_image_entry(kind, entry, entries[-1])
    decoded = []
    real_decode = image_cache._decode_full_image
    monkeypatch.setattr(image_cache, "_decode_full_image", lambda path: decoded.append(path.name) or real_decode(path))
    monkeypatch.setattr(image_cache, "_remade", [0])
    monkeypatch.setattr(image_cache, "REPORTED_REMADE", 100)
    later = ChestXrayDataset(pairs, synth_dir, 64, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger=image_cache.__name__):
        got = [np.asarray(later.load_image(i)) for i in range(len(pairs))]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert len(decoded) == len(IMAGE_DAMAGE)  # every damaged entry remade, the intact one read
    assert len(caplog.records) == len(IMAGE_DAMAGE) and "making it again" in caplog.text
    caplog.clear()
    again = ChestXrayDataset(pairs, synth_dir, 64, cache_dir=tmp_path / "cache")  # the remade entries now hold
    with caplog.at_level(logging.WARNING, logger=image_cache.__name__):
        assert all(np.array_equal(np.asarray(again.load_image(i)), e) for i, e in enumerate(expected))
    assert caplog.records == [] and len(decoded) == len(IMAGE_DAMAGE)


# ---------------------------------------------------------------- two processes, one cache ---

SHARED_CACHE_WORKER = """
import hashlib, logging, sys
import numpy as np, pandas as pd, torch
from cxr_helpers.core.cache_entries import read_entry, write_entry
from cxr_helpers.data.dataset import ChestXrayDataset

logging.basicConfig(level=logging.WARNING, format="WARNING %(message)s")
pairs_csv, data_dir, cache, entry, me = sys.argv[1:6]
# The same resized films into the same image cache as the other process, at the same time ...
dataset = ChestXrayDataset(pd.read_csv(pairs_csv), data_dir, 64, cache_dir=cache)
dataset.warm_cache(workers=2, progress=False)
pixels = hashlib.sha256(b"".join(np.asarray(dataset.load_image(i)).tobytes() for i in range(len(dataset))))
# ... and one tensor entry written and read back in turns with it: each read is a whole entry.
torn = 0
for i in range(150):
    write_entry(entry, {"x": torch.full((512, 64), float(int(me) * 1000 + i))}, "shared")
    got = read_entry(entry, "shared", rows={"x": 512})
    torn += got is None or got["x"].unique().numel() != 1
print(pixels.hexdigest(), torn)
"""


def test_two_processes_sharing_a_cache_each_see_whole_entries(pairs_csv, synth_dir, tmp_path):
    import os
    import subprocess
    import sys

    pairs = tmp_path / "pairs.csv"
    pd.read_csv(pairs_csv).head(40).to_csv(pairs, index=False)
    cache, entry = tmp_path / "cache", tmp_path / "cache" / "shared.safetensors"
    runs = [subprocess.Popen([sys.executable, "-c", SHARED_CACHE_WORKER, str(pairs), str(synth_dir), str(cache),
                              str(entry), str(me)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}) for me in (1, 2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-2000:]
        assert "WARNING" not in err, err  # no entry was ever seen half-written or foreign
    digests, torn = zip(*(out.split() for out, _ in outputs), strict=True)
    assert torn == ("0", "0") and digests[0] == digests[1]
    # The control: a fresh cache in this process gives the same pixels, and the shared entries hold.
    fresh = ChestXrayDataset(pd.read_csv(pairs), synth_dir, 64, cache_dir=None)
    import hashlib

    assert hashlib.sha256(b"".join(np.asarray(fresh.load_image(i)).tobytes()
                                   for i in range(len(fresh)))).hexdigest() == digests[0]
    assert cache_entries.read_entry(entry, "shared", rows={"x": 512}) is not None
