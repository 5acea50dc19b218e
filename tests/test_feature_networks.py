"""The real feature networks' code paths: torch-fidelity's Inception-v3 and torchxrayvision's
DenseNet-121, with random weights written here (the real weights are downloads)."""

import inspect

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cxr_helpers.evaluation import stage as ev
from cxr_helpers.evaluation import features
from cxr_helpers.evaluation import embeddings
from cxr_helpers.evaluation import metrics
from cxr_helpers.config.stages import EvalConfig, stage_config
from cxr_helpers.core.errors import CxrError

from test_evaluate import split_images, write_set


def as_uint8_rgb(images):
    return torch.stack([torch.from_numpy(np.array(im)).expand(3, -1, -1) for im in images])


def test_inception_features_give_torchmetrics_own_fid_kid_and_is(pairs_csv, synth_dir, inception_weights):
    """One shared pass through our InceptionFeatures = torchmetrics' three metrics, each running
    its own NoTrainInceptionV3 on the same weights file. antialias=False: the original FID
    resize, which torch-fidelity (and so this project) uses; torchmetrics' default differs."""
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    real = as_uint8_rgb(split_images(pairs_csv, synth_dir, "test")[0][:6])
    fake = as_uint8_rgb(split_images(pairs_csv, synth_dir, "train")[0][:6])
    weights = str(inception_weights)
    # torchmetrics < 1.5 has no `antialias` (nor FID's weights-path argument): its only resize is
    # then the original one, so the network is built with the flag only where it exists.
    original_resize = ({"antialias": False} if "antialias" in inspect.signature(NoTrainInceptionV3).parameters
                       else {})
    fid = FrechetInceptionDistance(feature=NoTrainInceptionV3("inception-v3-compat", ["2048"], weights,
                                                              **original_resize))
    kid = KernelInceptionDistance(feature=NoTrainInceptionV3("inception-v3-compat", ["2048"], weights,
                                                             **original_resize),
                                  subset_size=4)
    score = InceptionScore(feature=NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], weights,
                                                      **original_resize), splits=2)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    score.update(fake)
    torch.manual_seed(0)
    kid_separate = tuple(float(v) for v in kid.compute())
    torch.manual_seed(0)
    is_separate = tuple(float(v) for v in score.compute())

    net = features.InceptionFeatures(inception_weights)
    real_pool, _ = embeddings.embed(net, real, 4, progress=False)
    fake_pool, fake_logits = embeddings.embed(net, fake, 4, progress=False)
    assert real_pool.shape == (6, 2048) and fake_logits.shape == (6, 1008)
    fid_shared = metrics.torchmetrics_fid(real_pool, fake_pool)
    assert fid_shared > 0.01 and is_separate[0] > 1.001  # the random network tells images apart
    assert fid_shared == pytest.approx(float(fid.compute()), rel=1e-4)
    assert metrics.torchmetrics_kid(real_pool, fake_pool, 4, 0) == pytest.approx(kid_separate, rel=1e-3)
    is_shared = metrics.torchmetrics_is(fake_logits, 2, 0)
    assert is_shared[0] - 1 == pytest.approx(is_separate[0] - 1, rel=1e-3)
    assert is_shared[1] == pytest.approx(is_separate[1], rel=1e-2)


def test_evaluate_with_a_local_inception_weights_file(pairs_csv, synth_dir, inception_weights, tmp_path):
    images, prompts = split_images(pairs_csv, synth_dir, "test")
    copies = write_set(tmp_path / "copies", images, prompts)
    others = write_set(tmp_path / "others", *split_images(pairs_csv, synth_dir, "train"))
    cfg = stage_config(EvalConfig, pairs=str(pairs_csv), data_dir=str(synth_dir), out=str(tmp_path / "eval"),
                       generated=(f"copies={copies}", f"others={others}"), feature_weights=str(inception_weights),
                       n=4, metrics=("fid", "kid", "is"), real_floor=False, interval_groups=0)
    result = ev.evaluate(cfg, progress=False)
    assert cfg.feature_net == "inception"
    assert set(result.table["feature_network"]) == {features.InceptionFeatures.name}
    assert not any("STAND-IN" in note for note in result.notes)
    value = result.table.set_index(["set", "metric"])["value"]
    # The same 4 images on both sides score ~0; 4 other films do not.
    assert abs(value["copies", "fid"]) < 1e-3 * value["others", "fid"]
    assert value["others", "is"] > 1


def test_a_weights_file_that_is_more_than_tensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload()}, evil)
    with pytest.raises(CxrError, match="is not a plain PyTorch state dict.*not unpickling"):
        features.InceptionFeatures(evil)
    assert not marker.exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(CxrError, match="is not torch-fidelity's Inception FID weights"):
        features.InceptionFeatures(wrong)


def test_inception_weights_from_torch_hubs_cache_or_one_sentence(monkeypatch, tmp_path, inception_weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(CxrError, match="weights-inception-2015-12-05-6726825d.pth.*no internet"
                                       ".*--feature-weights PATH"):
        features.resolve_inception_weights(None)
    with pytest.raises(CxrError, match="does not exist"):
        features.resolve_inception_weights(tmp_path / "nope.pth")
    cached = tmp_path / "checkpoints" / features.INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir()
    cached.write_bytes(inception_weights.read_bytes())
    assert features.resolve_inception_weights(None) == cached  # where torch-fidelity's own download lands


def test_inception_weights_name_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert features.INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3


@pytest.fixture(scope="module")
def xrv_weights(tmp_path_factory):
    import torchxrayvision as xrv

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("xrv") / "densenet-random.safetensors"
    save_file(xrv.models.DenseNet(weights=None, op_threshs=None).state_dict(), str(path))
    return path


def test_xrv_fid_from_a_local_weights_file(pairs_csv, synth_dir, xrv_weights, tmp_path):
    images, prompts = split_images(pairs_csv, synth_dir, "test")
    copies = write_set(tmp_path / "copies", images, prompts)
    cfg = stage_config(EvalConfig, pairs=str(pairs_csv), data_dir=str(synth_dir), out=str(tmp_path / "eval"),
                       generated=(f"copies={copies}",), feature_net="standin", xrv_weights=str(xrv_weights),
                       metrics=("fid", "xrv"), interval_groups=0)
    result = ev.evaluate(cfg, progress=False)
    xrv_rows = result.table[result.table["metric"] == "fid_xrv"].set_index("set")
    assert list(xrv_rows.index) == ["copies", "real train (floor)"]
    assert (xrv_rows["feature_network"] == features.xrv_name()).all() and "MIMIC-CXR" in features.xrv_name()
    # Random DenseNet weights give features in the hundreds: FID's float rounding scales with them.
    assert abs(xrv_rows.loc["copies", "value"]) < 1e-4 * xrv_rows.loc["real train (floor)", "value"]
    assert not any("XRV" in note for note in result.notes)
    # The weights that saw this collection: used when asked for, named so in the table and the notes.
    result = ev.evaluate(stage_config(EvalConfig, **{**cfg.__dict__, "out": str(tmp_path / "eval-all"),
                                                     "xrv_model": "densenet121-res224-all"}), progress=False)
    named = result.table.loc[result.table["metric"] == "fid_xrv", "feature_network"]
    assert (named == features.xrv_name("densenet121-res224-all")).all() and named.str.contains("INCLUDES OpenI").all()
    assert any("include OpenI, the Indiana University collection" in note for note in result.notes)


def test_xrv_weights_bad_or_missing(pairs_csv, synth_dir, tmp_path, monkeypatch):
    import torchxrayvision as xrv

    images, prompts = split_images(pairs_csv, synth_dir, "test")
    gen = write_set(tmp_path / "gen", images[:4], prompts[:4])
    base = dict(pairs=str(pairs_csv), data_dir=str(synth_dir), out=str(tmp_path / "eval"), generated=(str(gen),),
                feature_net="standin", metrics=("fid", "xrv"), interval_groups=0)
    # Not given, not cached, no internet: skipped, and the note names the file to fetch.
    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(tmp_path / "xrv-cache"))
    result = ev.evaluate(stage_config(EvalConfig, **base), progress=False)
    assert "fid_xrv" not in set(result.table["metric"])
    assert any(note.startswith("XRV DenseNet FID skipped") and features.xrv_weights_file() in note
               for note in result.notes)
    # Given but wrong: an error, not a silent skip.
    other = tmp_path / "other.safetensors"
    save_file({"features.conv0.weight": torch.zeros(1)}, str(other))
    for i, (weights, message) in enumerate([(other, "is not a state dict of torchxrayvision's DenseNet-121"),
                                            (tmp_path / "no-such-folder", "does not exist"),
                                            (tmp_path, f"{features.xrv_weights_file()} .* are not in")]):
        # A fresh --out each: the first evaluation's folder would refuse other weights as other settings.
        with pytest.raises(CxrError, match=message):
            ev.evaluate(stage_config(EvalConfig, **{**base, "out": str(tmp_path / f"eval-{i}")},
                                     xrv_weights=str(weights)), progress=False)


class _Payload:
    """Pickles as a call of os.system: loading it with plain torch.load would run the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_xrv_release_file_is_read_as_tensors_and_a_pickle_payload_never_runs(pairs_csv, synth_dir, tmp_path):
    import torchxrayvision as xrv

    # The release file pickles a whole DenseNet: its tensors load into the network we build.
    torch.manual_seed(1)
    released = xrv.models.DenseNet(weights=None, op_threshs=None)
    folder = tmp_path / "xrv"
    folder.mkdir()
    torch.save(released, folder / features.xrv_weights_file())
    net = features.XRVFeatures(str(folder)).net
    for name, value in released.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name

    # A file under the release name (or any name) that would run code is refused, and runs nothing.
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"features.conv0.weight": _Payload(marker)}, evil / features.xrv_weights_file())
    torch.save(_Payload(marker), tmp_path / "evil.pt")
    images, prompts = split_images(pairs_csv, synth_dir, "test")
    gen = write_set(tmp_path / "gen", images[:4], prompts[:4])
    for weights in (evil, tmp_path / "evil.pt"):
        cfg = stage_config(EvalConfig, pairs=str(pairs_csv), data_dir=str(synth_dir), out=str(tmp_path / "eval"),
                           generated=(str(gen),), feature_net="standin", metrics=("fid", "xrv"), interval_groups=0,
                           xrv_weights=str(weights))
        with pytest.raises(CxrError, match=r"is not plain tensors \(it needs .*system\); not unpickling it"):
            ev.evaluate(cfg, progress=False)
    assert not marker.exists()
    # A file that is not a torch file at all: one sentence too.
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CxrError, match="junk.pt (is not plain tensors|could not be read as tensors)"):
        features.XRVFeatures(str(tmp_path / "junk.pt"))


def test_features_are_made_in_full_float32_not_tf32():
    """cuDNN allows TF32 convolutions by default on a GPU; the feature pass turns that off and
    restores the user's setting after."""
    seen = []

    class Recorder(torch.nn.Module):
        num_features = 2

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return images.float().mean((2, 3))[:, :2], images.float().mean((2, 3))

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        pool, _ = embeddings.embed(Recorder(), torch.zeros(3, 3, 8, 8, dtype=torch.uint8), batch_size=2, progress=False)
        assert seen == [(False, False), (False, False)] and pool.shape == (3, 2)
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
