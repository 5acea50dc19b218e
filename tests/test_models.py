import json

import pytest
import torch

from cxr_helpers.config.stages import TinyModelConfig
from cxr_helpers.core.errors import CxrError
from cxr_helpers.demo.tiny_model import build_tiny_pipeline, make_tiny_model
from cxr_helpers.models.loading import load_pipeline
from cxr_helpers.models.tokenizer import load_tokenizer


def test_rebuilt_tokenizer_is_sd15s(tokenizer):
    # facts.md: SD1.5's tokenizer gives these ids.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77


def test_tiny_model_loads_in_plain_diffusers_with_sd15_shapes(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    assert pipe.vae_scale_factor == 8  # as SD1.5: 128 px -> 16 x 16 latents
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    for name in ("vocab.json", "merges.txt"):
        assert (tiny_model_dir / "tokenizer" / name).is_file()
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)
    image = pipe("Cardiomegaly.", num_inference_steps=2, height=128, width=128, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 128, 128, 3)


def test_tiny_model_is_deterministic_for_a_seed():
    a, b, c = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    wa, wb, wc = (dict(p.unet.named_parameters()) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_load_pipeline_uses_the_same_loader_for_local_dirs(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir)
    assert pipe.safety_checker is None


def test_bad_model_and_tokenizer_sources_are_explained(tmp_path):
    with pytest.raises(CxrError, match="has no model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(CxrError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(CxrError, match="is not a directory"):
        load_tokenizer(tmp_path / "nope")
    # A hub id with no internet (the tests force HF_HUB_OFFLINE): the sentence says what to do.
    with pytest.raises(CxrError, match="needs internet.*or pass a local diffusers directory"):
        load_tokenizer("stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(CxrError, match="needs internet"):
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    # The seed's id was deleted from the hub: one sentence naming the maintained copy, not "turn internet on".
    for load in (load_tokenizer, load_pipeline):
        with pytest.raises(CxrError, match="'runwayml/stable-diffusion-v1-5' was deleted from the Hugging Face hub "
                                           "in 2024; use its maintained copy "
                                           "'stable-diffusion-v1-5/stable-diffusion-v1-5'"):
            load("runwayml/stable-diffusion-v1-5")


def test_make_tiny_model_saves_its_config(tmp_path):
    out = make_tiny_model(TinyModelConfig(out=str(tmp_path / "m"), seed=3))
    payload = json.loads((out / "cxr_tiny_model_config.json").read_text())
    assert payload["config"]["seed"] == 3 and (out / "model_index.json").is_file()


# ---------------------------------------------------------------- the pretrained demo base ---

def _small_pretraining(out, seed=0, **kw):
    """The pretraining path with a handful of steps: what it writes, not how well it draws (the
    demo's run in test_notebooks.py measures that)."""
    values = dict(out=str(out), seed=seed, pretrain=True, resolution=32, films=16, vae_steps=3, unet_steps=3)
    return TinyModelConfig(**{**values, **kw})


def test_pretraining_is_deterministic_and_loads_as_sd15_loads(tmp_path):
    from cxr_helpers.demo.tiny_model import tiny_model_is_built
    from safetensors.torch import load_file

    a = make_tiny_model(_small_pretraining(tmp_path / "a"), progress=False)
    b = make_tiny_model(_small_pretraining(tmp_path / "b"), progress=False)
    c = make_tiny_model(_small_pretraining(tmp_path / "c", seed=1), progress=False)
    random = make_tiny_model(TinyModelConfig(out=str(tmp_path / "random")), progress=False)
    weights = {d: load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (a, b, c, random)}
    assert all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])  # same seed: same weights
    assert not all(torch.equal(weights[a][k], weights[c][k]) for k in weights[a])
    assert not all(torch.equal(weights[a][k], weights[random][k]) for k in weights[a])  # it did train
    payload = json.loads((a / "cxr_tiny_model_config.json").read_text())
    assert payload["config"]["pretrain"] is True and payload["pretraining"]["unet_loss_last_100"] > 0
    assert payload["pretraining"]["posterior_std_over_latent_std"] > 0
    assert "knows no findings" in payload["note"]
    pipe = load_pipeline(a)  # the same loader as SD1.5's, with the latent scale the VAE measured
    assert pipe.vae.config.scaling_factor == pytest.approx(payload["pretraining"]["latent_scale"], rel=1e-4)
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)
    assert tiny_model_is_built(a, _small_pretraining(tmp_path / "elsewhere"))  # where it lies is not what it is
    assert not tiny_model_is_built(a, _small_pretraining(a, unet_steps=4))
    assert not tiny_model_is_built(a, TinyModelConfig(out=str(a)))


def test_pretraining_captions_never_come_from_their_film():
    # The base may read report words, never with the film they describe: a caption is drawn from
    # the film's view and the seed alone (so it knows no findings, and its films do not move
    # with the finding a prompt names).
    import inspect

    from cxr_helpers.demo.pretrain import GENERIC_CAPTION, caption_films

    assert list(inspect.signature(caption_films).parameters) == ["views", "seed"]
    views = ["Frontal", "Lateral"] * 200
    captions = caption_films(views, seed=0)
    assert captions == caption_films(views, seed=0) != caption_films(views, seed=1)
    named_view = [c == f"a {v.lower()} chest x-ray" for c, v in zip(captions, views, strict=True)]
    others = [c for c, is_view in zip(captions, named_view, strict=True)
              if not is_view and c not in ("", GENERIC_CAPTION)]
    assert 0.4 < sum(named_view) / len(captions) < 0.6 and 0.3 < len(others) / len(captions) < 0.5
    assert any("cardiomegaly" in c.lower() for c in others) and any("effusion" in c.lower() for c in others)


def test_a_tiny_model_folder_with_other_settings_is_kept_unless_overwrite(tmp_path):
    out = make_tiny_model(_small_pretraining(tmp_path / "m"), progress=False)
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(CxrError, match="holds tiny_model output made with other unet_steps.*--overwrite"):
        make_tiny_model(_small_pretraining(out, unet_steps=4), progress=False)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(CxrError, match="no cxr-lora tiny_model run made"):
        make_tiny_model(TinyModelConfig(out=str(tmp_path / "theirs")), progress=False)
    make_tiny_model(_small_pretraining(out, unet_steps=4, overwrite=True), progress=False)
    assert list(tmp_path.glob("m.replaced-*"))  # the old model was moved aside, not lost


def test_a_model_folder_with_pickle_weights_or_its_own_code_is_refused_in_one_sentence(tiny_model_dir, tmp_path):
    """Nothing is unpickled and no folder's code is run: refused before diffusers is asked (its
    own error would be a traceback suggesting weights_only=False). The control: the folder as
    made loads."""
    import shutil

    from safetensors.torch import load_file

    from cxr_helpers.models.loading import check_model_dir, load_training_parts

    assert check_model_dir(str(tiny_model_dir)) == tiny_model_dir  # the control
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    for load in (load_pipeline, load_training_parts):
        with pytest.raises(CxrError, match=r"unet holds only pickle weights \(diffusion_pytorch_model.bin\), which "
                                           r"this project never loads"):
            load(str(pickled))
    coded = tmp_path / "coded"
    shutil.copytree(tiny_model_dir, coded)
    (coded / "pipeline.py").write_text("import os  # would run on load\n")
    with pytest.raises(CxrError, match=r"brings code of its own \(pipeline.py\)"):
        load_pipeline(str(coded))
    (coded / "pipeline.py").unlink()
    index = json.loads((coded / "model_index.json").read_text())
    (coded / "model_index.json").write_text(json.dumps({**index, "_class_name": ["my_pipeline", "MyPipeline"]}))
    with pytest.raises(CxrError, match="brings code of its own"):
        load_pipeline(str(coded))


def test_a_damaged_lora_file_is_named_damaged_not_missing(lora_dir, tmp_path):
    import shutil

    from cxr_helpers.core.layout import LORA_WEIGHTS
    from cxr_helpers.models.generation import check_lora_dir

    assert check_lora_dir(lora_dir) == lora_dir  # the control
    damages = {"truncated": lambda b: b[: len(b) // 2], "bad header": lambda b: b[:8] + b"{not json" + b[17:],
               "empty": lambda b: b""}
    for name, damage in damages.items():
        broken = tmp_path / name
        shutil.copytree(lora_dir, broken)
        weights = broken / LORA_WEIGHTS
        weights.write_bytes(damage(weights.read_bytes()))
        with pytest.raises(CxrError, match=rf"the LoRA file .*{LORA_WEIGHTS} is damaged .*train again"):
            check_lora_dir(broken)
