"""Stand-ins that tests and benchmarks use in place of downloads (never imported by the package)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
from torch import nn

from cxr_helpers.core.files import atomic_path


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a state dict of torch-fidelity's Inception-v3 with random weights (He-normal convs,
    so activations keep their scale through the ReLUs and the features are not all ~0): same
    architecture and compute as the real network, meaningless values. For offline tests and
    benchmarks only; nothing here is downloaded."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    # The constructor always loads weights; let it load nothing so the fresh init stays.
    with mock.patch(f"{FeatureExtractorInceptionV3.__module__}.load_state_dict_from_url", return_value={}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", return_value=None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    # The features vary little between images: wider logits give an IS above 1, yet not so wide
    # that float32 softmax underflows to 0 for a whole class (torchmetrics' IS is NaN then).
    nn.init.normal_(net.fc.weight, std=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)
    return path
