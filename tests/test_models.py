import json

import pytest
import torch

from cxr_helpers.config import TinyModelConfig
from cxr_helpers.errors import CxrError
from cxr_helpers.models import build_tiny_pipeline, load_pipeline, make_tiny_model
from cxr_helpers.tokenizer import load_tokenizer


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
        with pytest.raises(CxrError, match="'runwayml/stable-diffusion-v1-5' was deleted from the Hugging Face hub in 2024; "
                                           "use its maintained copy 'stable-diffusion-v1-5/stable-diffusion-v1-5'"):
            load("runwayml/stable-diffusion-v1-5")


def test_make_tiny_model_saves_its_config(tmp_path):
    out = make_tiny_model(TinyModelConfig(out=str(tmp_path / "m"), seed=3))
    payload = json.loads((out / "cxr_tiny_model_config.json").read_text())
    assert payload["config"]["seed"] == 3 and (out / "model_index.json").is_file()
