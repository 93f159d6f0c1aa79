"""Faithfulness: ROAD's imputation, exact removal counts, and a model whose evidence is known."""
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
from pytorch_grad_cam.metrics.road import NoisyLinearImputer

from utils.faithfulness import (cam_maps, faithfulness, faithfulness_table, headline, impute,
                                most_faithful, removal_masks)
from utils.gradcam import LayerError
from utils.plots import faithfulness_figure

CORNERS = {0: (slice(0, 8), slice(24, 32)), 1: (slice(24, 32), slice(0, 8))}


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: a second thread only adds start-up and contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TwoCorners(nn.Module):
    """As test_gradcam's TwoRegions: class 0 = red in the top-right 8x8 corner, class 1 = green bottom-left.

    Each logit sums its own channel over its own corner of an 8x8 feature map, so all
    evidence for a class lies in that corner and nowhere else.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU(), nn.AvgPool2d(4))
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([[1.0, -1, -1], [-1, 1, -1]]).view(2, 3, 1, 1))

    def forward(self, x):
        f = self.features(x)
        return torch.stack([f[:, 0, :2, 6:].sum((1, 2)), f[:, 1, 6:, :2].sum((1, 2))], 1)


def scenes(n=6, seed=0):
    """Noise with a red and a green square; every third image has the stronger green (class 1 wins)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 0.1, (n, 3, 32, 32)).astype(np.float32)
    for i in range(n):
        red, green = (1.0, 2.0) if i % 3 == 0 else (2.0, 1.0)
        img[i, 0, :8, 24:] += red
        img[i, 1, 24:, :8] += green
    return torch.from_numpy(img)


def hand_maps(model, method, layer, images, classes):
    """Hand-made maps: the explained class's corner, the other corner, a constant, or noise."""
    out = np.zeros((len(images), 32, 32), np.float32)
    for i, c in enumerate(classes.tolist()):
        if method in ("right", "wrong"):
            out[(i, *CORNERS[c if method == "right" else 1 - c])] = 1.0
    if method == "noise":
        out = np.random.default_rng(7).random(out.shape, dtype=np.float32)
    return out


def by_method(rows):
    table = {}
    for r in rows:
        table.setdefault(r["method"], []).append(r)
    return table


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # the reference's numpy calls
def test_impute_matches_road_reference():
    """The batched solve equals pytorch-grad-cam's sparse ROAD solve (noise off), image by image."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    removed = torch.rand(4, 32, 32, generator=g) < torch.tensor([0.1, 0.5, 0.9, 0.0])[:, None, None]
    removed[1, :16, :16] = True  # a large hole reaching two edges
    ours = impute(x, removed)
    for i in range(3):
        theirs = NoisyLinearImputer(noise=0)(x[i], (~removed[i]).float())
        assert (ours[i] - theirs).abs().max() < 1e-4, i
    assert torch.equal(ours[3], x[3])  # nothing removed: unchanged
    assert torch.equal(ours[~removed[:, None].expand_as(x)], x[~removed[:, None].expand_as(x)])
    noise = torch.randn(x.shape, generator=g)
    noisy = impute(x, removed, noise)
    mask = removed[:, None].expand_as(x)
    assert torch.allclose(noisy[mask], ours[mask] + noise[mask], atol=1e-4)
    assert torch.equal(noisy[~mask], x[~mask])


def test_removal_masks_count_rank_and_ties():
    g = torch.Generator().manual_seed(1)
    heat = (torch.rand(3, 32, 32, generator=g) * 4).floor() / 4  # 4 levels: many ties
    heat[2] = 0.5  # a constant map
    keys = torch.stack([torch.randperm(1024, generator=g) for _ in range(3)])
    counts = [round(f * 1024) for f in (0.1, 0.2, 0.5)]
    assert counts == [102, 205, 512]
    masks = removal_masks(heat, keys, counts)
    assert masks.shape == (3, 3, 32, 32) and masks.dtype == torch.bool
    assert masks.sum((2, 3)).tolist() == [[k] * 3 for k in counts]
    assert (masks[0] <= masks[1]).all() and (masks[1] <= masks[2]).all()  # nested
    for f in range(3):
        for i in range(2):  # everything removed ranks at least as high as everything kept
            assert heat[i][masks[f, i]].min() >= heat[i][~masks[f, i]].max()
    for f, k in enumerate(counts):  # a constant map removes the first k pixels of the random order
        assert set(masks[f, 2].flatten().nonzero()[:, 0].tolist()) == set(keys[2, :k].tolist())
    assert torch.equal(masks, removal_masks(heat, keys, counts))  # deterministic
    other = removal_masks(heat, torch.stack([torch.randperm(1024, generator=g) for _ in range(3)]), counts)
    assert not torch.equal(masks, other)  # ties follow the keys


def test_known_answer_hand_made_maps():
    model, x = TwoCorners(), scenes()
    assert model(x).argmax(1).tolist() == [1, 0, 0, 1, 0, 0]
    rows = faithfulness(model, x, ["right", "wrong", "flat", "noise"], ["any"], maps=hand_maps, batch_size=4)
    assert len(rows) == 4 * 1 * 3 and all(type(r[k]) is float for r in rows for k in ("drop_map", "score"))
    rows = by_method(rows)
    for r in rows["right"]:  # the corner holds all the evidence: confidence collapses
        assert r["drop_map"] > 0.9 and r["drop_random"] < 0.05 and r["score"] > 0.85, r
    for r in rows["wrong"]:  # removing the rival's evidence only helps the explained class
        assert r["drop_map"] <= r["drop_random"] and r["score"] <= 0, r
    for r in rows["flat"]:  # ties go in the random order: exactly the baseline
        assert r["drop_map"] == r["drop_random"] and r["score"] == 0, r
    for r in rows["noise"]:
        assert abs(r["drop_map"]) < 0.05, r
    scores = headline([r for rs in rows.values() for r in rs])
    assert scores[("right", "any")] > 0.85 and scores[("wrong", "any")] <= 0 == scores[("flat", "any")]


def test_class_idx_chooses_the_explained_class():
    model, x = TwoCorners(), scenes()
    green = faithfulness(model, x, ["right"], ["any"], fractions=(0.1,), class_idx=1, maps=hand_maps)[0]
    p_green = torch.softmax(model(x), 1)[:, 1].mean().item()  # 0.98 on two images, 0.02 on four
    assert green["drop_map"] == pytest.approx(p_green, abs=0.03)  # p(green) falls to ~0 on every image
    per_image = faithfulness(model, x, ["right"], ["any"], fractions=(0.1,), class_idx=[1] * 6,
                             maps=hand_maps, batch_size=4)[0]
    assert per_image["drop_map"] == pytest.approx(green["drop_map"], abs=1e-6)
    with pytest.raises(ValueError, match="one per image"):
        faithfulness(model, x, ["right"], ["any"], class_idx=[0, 1], maps=hand_maps)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        faithfulness(model, x, ["right"], ["any"], class_idx=2, maps=hand_maps)


def test_real_cams_beat_random():
    model, x = TwoCorners(), scenes()
    rows = faithfulness(model, x, ["gradcam", "gradcam++"], ["features", "features.0"])
    assert [(r["layer"], r["method"], r["fraction"]) for r in rows] == [
        (layer, method, f) for layer in ("features", "features.0") for method in ("gradcam", "gradcam++")
        for f in (0.1, 0.2, 0.5)]
    assert all(r["images"] == 6 and r["score"] > 0.5 and r["drop_random"] < 0.05 for r in rows), rows
    assert set(most_faithful(rows)) == {"features", "features.0"}
    assert all(score > 0.5 for score in headline(rows).values())


def test_deterministic_for_a_seed_and_batch_size():
    model, x = TwoCorners(), scenes()
    x[:, :, 8:24] += torch.randn(6, 3, 16, 32, generator=torch.Generator().manual_seed(3))  # busier middle

    def run(seed, batch_size):
        return faithfulness(model, x, ["noise"], ["any"], seed=seed, batch_size=batch_size, maps=hand_maps)

    first = run(0, 4)
    assert first == run(0, 4)
    assert [r["drop_random"] for r in run(0, 6)] == pytest.approx([r["drop_random"] for r in first], abs=1e-5)
    assert [r["drop_random"] for r in run(1, 4)] != [r["drop_random"] for r in first]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_leaves_model_and_images_as_found(mode):
    model, x = TwoCorners(), scenes(3)
    model.train(mode == "train")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    weights, before = [p.detach().clone() for p in model.parameters()], x.clone()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    faithfulness(model, x, ["gradcam"], ["features"], fractions=(0.2,))
    assert seen and not any(seen)  # every forward pass in eval mode
    assert model.training == (mode == "train") and torch.equal(x, before)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    fresh = TwoCorners()
    faithfulness(fresh, x, ["gradcam"], ["features"], fractions=(0.2,))
    assert all(p.grad is None for p in fresh.parameters())


def test_bad_arguments():
    model, x = TwoCorners(), scenes(2)
    for fractions in ((0.0,), (1.0,), (0.9999,), (1.5,), ()):
        with pytest.raises(ValueError, match="fraction"):
            faithfulness(model, x, ["gradcam"], ["features"], fractions=fractions)
    with pytest.raises(ValueError, match="unknown CAM method.*gradcam"):
        faithfulness(model, x, ["gradcamm"], ["features"])
    with pytest.raises(LayerError, match="no layer 'feature'"):
        faithfulness(model, x, ["gradcam"], ["feature"])
    with pytest.raises(ValueError, match="expected"):
        faithfulness(model, x, ["m"], ["l"], maps=lambda *a: np.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        faithfulness(model, x[0], ["gradcam"], ["features"])
    assert cam_maps(model, "gradcam", "features", x, torch.tensor([0, 0])).shape == (2, 32, 32)


def test_table_most_faithful_and_figure():
    def row(method, layer, f, drop_map, drop_random):
        return {"method": method, "layer": layer, "fraction": f, "images": 10,
                "drop_map": drop_map, "drop_random": drop_random, "score": drop_map - drop_random}
    rows = [row("gradcam", "layer3", 0.1, 0.30, 0.05), row("gradcam", "layer3", 0.5, 0.60, 0.20),
            row("gradcam++", "layer3", 0.1, 0.40, 0.05), row("gradcam++", "layer3", 0.5, 0.70, 0.20),
            row("gradcam", "layer2", 0.1, 0.10, 0.05), row("gradcam", "layer2", 0.5, 0.30, 0.20),
            row("gradcam++", "layer2", 0.1, 0.10, 0.05), row("gradcam++", "layer2", 0.5, 0.30, 0.20)]
    assert headline(rows)[("gradcam++", "layer3")] == pytest.approx(0.425)
    assert most_faithful(rows) == {"layer3": "gradcam++", "layer2": "gradcam"}  # a tie: the first
    text = faithfulness_table(rows)
    lines = text.splitlines()
    assert "10 images" in lines[0] and "10% map" in text and "50% map" in text
    assert [line.split()[:2] for line in lines[4:]] == [["layer3", "gradcam"], ["layer3", "gradcam++"],
                                                        ["layer2", "gradcam"], ["layer2", "gradcam++"]]
    assert lines[5].endswith("+0.425 *") and lines[4].endswith("+0.325")
    assert "0.400   0.050" in lines[5] and lines[6].endswith(" *") and not lines[7].endswith("*")
    fig = faithfulness_figure(rows)
    try:
        assert [ax.get_title() for ax in fig.axes] == ["layer3 (10 images)", "layer2 (10 images)"]
        assert [line.get_label() for line in fig.axes[0].lines] == ["gradcam", "gradcam++", "random"]
        assert list(fig.axes[0].lines[1].get_ydata()) == [0.40, 0.70]
    finally:
        plt.close(fig)
