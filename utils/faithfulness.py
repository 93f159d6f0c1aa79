"""Faithfulness of CAM maps: remove what a map calls important and watch the confidence fall.

    rows = faithfulness(model, images, ["gradcam", "gradcam++"], ["layer3"])
    print(faithfulness_table(rows))        # plain text for summary.txt
    most_faithful(rows)                    # {"layer3": "gradcam"}

For each image, method and layer the map ranks the pixels; the top ``round(f * H * W)``
pixels (all channels of each) are removed for every fraction ``f``, and the drop of the
explained class's softmax probability (the predicted class unless ``class_idx`` says
otherwise) is compared with removing as many pixels chosen at random. Drops are mean
probability drops over the images, as fractions of 1 (0.30 = 30 percentage points); a
row's ``score`` is ``drop_map - drop_random`` and a method's headline score (``headline``)
is that score averaged over the fractions. A faithful map scores well above 0; a map no
better than chance scores about 0.

Removal follows ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022, https://arxiv.org/abs/2202.00449), "most relevant first":
removed pixels are filled by its noisy linear imputation, each one the weighted mean of its
eight neighbours (4 x 1/6, 4 x 1/12), solved jointly for all removed pixels, plus Gaussian
noise of std 0.01 in the model's (normalised) input space. A constant fill (the mean, or
black) draws the removed set's outline into the image, and the network then reacts to that
shape instead of the missing evidence, so random removal is punished too and the two drops
blur together; a blur keeps part of the removed evidence. The linear system is the one of
pytorch-grad-cam's ``metrics/road.py`` (from github.com/tleemann/road_evaluation); it is
solved here by conjugate gradients on all images at once instead of one sparse solve per
image, and the tests check the two agree. Unlike ROAD's percentile threshold, exactly
``round(f * H * W)`` pixels go: ties in a map are broken by a seeded random order per image,
the same order that picks the random baseline's pixels, so a constant map scores exactly 0.
"""
import numpy as np
import torch
import torch.nn.functional as F

from .gradcam import CAMS, find_layer

FRACTIONS = (0.1, 0.2, 0.5)
NOISE = 0.01  # ROAD's noise std for imputed pixels (input units)


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """Per channel, each pixel's neighbours inside the image weighted as ROAD: 1/6 direct, 1/12 diagonal."""
    p = F.pad(x, (1, 1, 1, 1))  # zeros outside: those neighbours do not count
    direct = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]
    diagonal = p[..., :-2, :-2] + p[..., :-2, 2:] + p[..., 2:, :-2] + p[..., 2:, 2:]
    return direct / 6 + diagonal / 12


def impute(images: torch.Tensor, removed: torch.Tensor, noise=None, tol: float = 1e-6) -> torch.Tensor:
    """ROAD's noisy linear imputation of the ``removed`` (B, H, W) pixels of (B, C, H, W) ``images``.

    Each removed pixel solves ``s_i x_i = sum_j w_ij x_j`` over its in-image neighbours j
    (``s_i`` = their total weight; kept pixels are fixed), as NoisyLinearImputer in
    pytorch-grad-cam's metrics/road.py; here by batched conjugate gradients (the system is
    symmetric positive definite while each removed region touches a kept pixel). ``noise``:
    a tensor like ``images`` added at removed pixels, or None. Kept pixels are returned as given.
    """
    x = images.float()
    m = removed[:, None].to(x)  # (B, 1, H, W), 1 = removed
    s = _neighbours(torch.ones_like(x[:1, :1]))  # total neighbour weight: 1 inside, less at edges

    def system(v):  # the matrix of the removed pixels' equations; v is 0 at kept pixels
        return m * (s * v - _neighbours(v))

    b = m * _neighbours(x * (1 - m))
    v = b / s  # start: the kept neighbours' weighted sum
    r = b - system(v)
    p, rr = r, (r * r).sum((2, 3), keepdim=True)
    limit = tol ** 2 * (b * b).sum((2, 3), keepdim=True).clamp(min=1.0)
    for _ in range(x.shape[-1] * x.shape[-2]):  # exact in at most that many steps
        if bool((rr <= limit).all()):
            break
        q = system(p)
        pq = (p * q).sum((2, 3), keepdim=True)
        alpha = torch.where(pq > 0, rr / pq, torch.zeros_like(pq))
        v, r = v + alpha * p, r - alpha * q
        rr_new = (r * r).sum((2, 3), keepdim=True)
        p = r + torch.where(rr > 0, rr_new / rr, torch.zeros_like(rr)) * p
        rr = rr_new
    if noise is not None:
        v = v + noise.to(v)
    return torch.where(m.bool(), v, x)


def removal_masks(heat: torch.Tensor, keys: torch.Tensor, counts) -> torch.Tensor:
    """(F, B, H, W) bool: per count k, the k pixels of each (H, W) map in ``heat`` ranked highest.

    Ties go by ``keys`` (B, H*W), a random permutation per image (lower first), so a
    constant map removes the pixels a random removal with the same keys would.
    """
    b, h, w = heat.shape
    perm = keys.to(heat.device)
    ranked = torch.argsort(-heat.reshape(b, h * w).float().gather(1, perm), dim=1, stable=True)
    order = perm.gather(1, ranked)  # pixel indices, most important first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=order.device).expand(b, -1))
    ks = torch.as_tensor(list(counts), device=order.device)
    return (rank[None] < ks[:, None, None]).reshape(len(ks), b, h, w)


def _draws(seed: int, first: int, shape) -> tuple:
    """Per image (numbered from ``first``): a random pixel order and ROAD's noise, from its own stream.

    Each image has its own generator, so the draws do not depend on the batch size.
    """
    b, c, h, w = shape
    rngs = [np.random.default_rng([seed, first + i]) for i in range(b)]
    keys = np.stack([rng.permutation(h * w) for rng in rngs])
    noise = np.stack([NOISE * rng.standard_normal((c, h, w), dtype=np.float32) for rng in rngs])
    return torch.from_numpy(keys), torch.from_numpy(noise)


def _drops(model, x, heat, keys, counts, noise, classes, before) -> np.ndarray:
    """(F,) summed probability drops over the batch when each count's top pixels are imputed."""
    masks = removal_masks(heat, keys, counts)  # (F, B, H, W)
    n = len(counts)
    filled = impute(x.repeat(n, 1, 1, 1), masks.flatten(0, 1), noise.repeat(n, 1, 1, 1))
    probs = F.softmax(model(filled).float(), 1).gather(1, classes.repeat(n)[:, None])[:, 0]
    return (before.repeat(n) - probs).view(n, -1).sum(1).cpu().double().numpy()


def cam_maps(model, method: str, layer: str, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """(B, H, W) maps of ``CAMS[method]`` at ``layer`` for ``classes``: the default map source."""
    with CAMS[method](model, layer) as cam:
        return cam(images, classes)


def _counts(fractions, pixels: int) -> list:
    """Pixels removed per fraction: ``round(f * pixels)``; each fraction must leave a pixel."""
    counts = []
    for f in fractions:
        k = round(float(f) * pixels)
        if not 0 < f < 1 or k >= pixels:
            raise ValueError(f"fractions must lie in (0, 1) and leave some pixel in place, got {f}")
        counts.append(k)
    if not counts:
        raise ValueError("give at least one fraction")
    return counts


def _classes(class_idx, logits: torch.Tensor, first: int, total: int) -> torch.Tensor:
    """The explained classes of a batch: predicted, one int for all, or one per image of the whole set."""
    if class_idx is None:
        return logits.argmax(1)
    idx = torch.as_tensor(class_idx, dtype=torch.long).flatten()
    if idx.numel() == 1:
        idx = idx.expand(total)
    if len(idx) != total:
        raise ValueError(f"class_idx has {len(idx)} entries for {total} images: give one per image")
    if idx.min() < 0 or idx.max() >= logits.shape[1]:
        raise ValueError(f"class_idx must be in [0, {logits.shape[1]}), got {idx.unique().tolist()}")
    return idx[first:first + len(logits)].to(logits.device)


def _check(model, images, methods, layers, maps) -> None:
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if not methods or not layers:
        raise ValueError("give at least one method and one layer")
    if maps is cam_maps:
        unknown = [m for m in methods if m not in CAMS]
        if unknown:
            raise ValueError(f"unknown CAM method(s) {unknown}: choose from {', '.join(CAMS)}")
        for layer in layers:
            find_layer(model, layer)  # LayerError naming the valid ones


def faithfulness(model, images, methods, layers, fractions=FRACTIONS, seed: int = 0, class_idx=None,
                 batch_size: int = 64, maps=cam_maps) -> list:
    """Rows {"method", "layer", "fraction", "images", "drop_map", "drop_random", "score"}, layer by layer.

    ``images``: (N, C, H, W) as the model sees them (normalised). Drops are mean softmax
    probability drops of the explained class (fractions of 1) after ROAD's imputation of the
    map's top pixels or of as many seeded random ones; ``score = drop_map - drop_random``.
    ``maps(model, method, layer, images, classes) -> (B, H, W)`` supplies the maps (default:
    ``cam_maps``). The model runs in eval mode, restored afterwards; parameters' ``.grad``
    are not touched.
    """
    images = torch.as_tensor(images)
    _check(model, images, methods, layers, maps)
    counts = _counts(fractions, images.shape[-1] * images.shape[-2])
    device = next(model.parameters()).device
    total = np.zeros((len(layers), len(methods), len(counts)))
    random = np.zeros(len(counts))
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(images), batch_size):
            x = images[first:first + batch_size].to(device, torch.float32)
            keys, noise = _draws(seed, first, x.shape)
            noise = noise.to(device)
            with torch.no_grad():
                logits = model(x).float()
            classes = _classes(class_idx, logits, first, len(images))
            before = F.softmax(logits, 1).gather(1, classes[:, None])[:, 0]
            with torch.no_grad():
                flat = torch.zeros(x.shape[0], *x.shape[2:], device=device)
                random += _drops(model, x, flat, keys, counts, noise, classes, before)
            for i, layer in enumerate(layers):
                for j, method in enumerate(methods):
                    heat = torch.as_tensor(maps(model, method, layer, x, classes), device=device)
                    if heat.shape != flat.shape:
                        raise ValueError(f"{method} at {layer}: maps of shape {tuple(heat.shape)}, "
                                         f"expected {tuple(flat.shape)}")
                    with torch.no_grad():
                        total[i, j] += _drops(model, x, heat, keys, counts, noise, classes, before)
    finally:
        model.train(was_training)
    n = len(images)
    return [{"method": method, "layer": layer, "fraction": float(f), "images": n,
             "drop_map": float(total[i, j, k] / n), "drop_random": float(random[k] / n),
             "score": float((total[i, j, k] - random[k]) / n)}
            for i, layer in enumerate(layers) for j, method in enumerate(methods)
            for k, f in enumerate(fractions)]


def headline(rows) -> dict:
    """{(method, layer): mean score over the fractions}, in the rows' order: the single number per map."""
    scores = {}
    for row in rows:
        scores.setdefault((row["method"], row["layer"]), []).append(row["score"])
    return {key: float(np.mean(values)) for key, values in scores.items()}


def most_faithful(rows) -> dict:
    """{layer: the method with the highest headline score there}; a tie goes to the first listed."""
    best = {}
    for (method, layer), score in headline(rows).items():
        if layer not in best or score > best[layer][1]:
            best[layer] = (method, score)
    return {layer: method for layer, (method, _) in best.items()}


def _num(value: float, width: int, sign: str = "") -> str:
    return f"{round(value, 3) + 0.0:{sign}{width}.3f}"  # + 0.0: no "-0.000"


def faithfulness_table(rows) -> str:
    """Plain text: per layer and method, the drops at each fraction and the headline score (* = best)."""
    if not rows:
        return "faithfulness: no rows\n"
    fractions = list(dict.fromkeys(row["fraction"] for row in rows))
    cells = {(r["method"], r["layer"], r["fraction"]): r for r in rows}
    scores, best = headline(rows), most_faithful(rows)
    lw = max(5, *(len(layer) for _, layer in scores))
    mw = max(6, *(len(method) for method, _ in scores))
    head = (f"faithfulness on {rows[0]['images']} images (ROAD, most relevant first): mean drop of the "
            "explained class's probability (0-1)\nwhen the map's top pixels are replaced by noisy linear "
            "imputation, against as many random pixels;\nscore = map - random, averaged over the fractions "
            "(about 0 = no better than chance; * = best at the layer)")
    names = [f"{100 * f:g}% map" for f in fractions]
    fw = max(8, *(len(name) for name in names))
    columns = "".join(f"  {name:>{fw}} {'random':>7}" for name in names)
    lines = [head, f"  {'layer':<{lw}}  {'method':<{mw}}{columns}  {'score':>7}"]
    for (method, layer), score in scores.items():
        drops = ""
        for f in fractions:
            row = cells.get((method, layer, f))
            drops += (f"  {_num(row['drop_map'], fw)} {_num(row['drop_random'], 7)}" if row
                      else f"  {'-':>{fw}} {'-':>7}")
        mark = " *" if best[layer] == method else ""
        lines.append(f"  {layer:<{lw}}  {method:<{mw}}{drops}  {_num(score, 7, '+')}{mark}")
    return "\n".join(lines) + "\n"
