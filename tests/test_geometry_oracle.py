import numpy as np
import torch
from PIL import Image

from cxr_helpers.evaluation.geometry_oracle import PA_ANGLES, GeometryOracle, costophrenic_fill, is_lateral
from cxr_helpers.data.image_cache import resize_xray
from cxr_helpers.demo.films import Finding, draw_patient, render


def _films(findings, view="Frontal", n=16):
    """Films as the evaluation sees them: drawn at a random aspect, stretched to 128 px."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([3, i])
        height = int(200 * rng.uniform(0.9, 1.1))
        width = int(height * rng.uniform(0.8, 1.25))
        film = render(findings, view, draw_patient(rng), height, width, rng)
        out.append(np.asarray(resize_xray(Image.fromarray(film, "L"), 128)))
    return out


def test_the_named_costophrenic_angle_fills_and_the_other_stays_clear():
    clear = _films([])
    for side, other in (("right", "left"), ("left", "right")):
        effusion = _films([Finding("effusion", side=side, severity="small")])
        pairs = list(zip(effusion, clear, strict=True))
        named = [costophrenic_fill(f, side) - costophrenic_fill(c, side) for f, c in pairs]
        unnamed = [costophrenic_fill(f, other) - costophrenic_fill(c, other) for f, c in pairs]
        # Same patients with and without the effusion: the named angle fills (every film), the other
        # does not move beyond the film grain.
        assert min(named) > 0.02 and np.median(named) > 0.1 and np.median(np.abs(unnamed)) < 0.03, side
    assert set(PA_ANGLES) == {"right", "left"}


def test_oracle_ranks_effusion_and_cardiomegaly_on_both_views():
    oracle = GeometryOracle()
    for view in ("Frontal", "Lateral"):
        sets = {"clear": _films([], view),
                "effusion": _films([Finding("effusion", side="bilateral", severity="small")], view),
                "cardiomegaly": _films([Finding("cardiomegaly", severity="mild")], view)}
        assert all(is_lateral(f) == (view == "Lateral") for films in sets.values() for f in films)
        scores = {k: oracle.score(torch.from_numpy(np.stack(v))[:, None]) for k, v in sets.items()}
        for finding, positive in (("Effusion", "effusion"), ("Cardiomegaly", "cardiomegaly")):
            pos, neg = scores[positive][finding].to_numpy(), scores["clear"][finding].to_numpy()
            assert (pos[:, None] > neg[None, :]).mean() > 0.9, (view, finding)
