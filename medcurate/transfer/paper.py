"""The metric of Juodelyte et al., "On dataset transferability in medical image classification".

Two parts, each measured on a class-stratified probe of the target's training images:

- LP, feature quality: neighbourhood components analysis (50 components) of the penultimate
  features, then the mean probability a 5-nearest-neighbour vote gives the true class, on the
  points the NCA and the vote were fitted on.
- FU, adaptability: with the classifier head removed and the model in eval mode, a triplet
  margin loss on the embeddings of each batch (floor(N/6) images, in probe order) is
  back-propagated; FU is the mean L2 norm of the weight gradient of the second conv layer over
  that of the first. Early layers that would move a lot relative to the stem suggest features
  that fine-tuning can still adapt. Variant ``relative`` (not the paper's) divides each layer's
  gradient norm by its weight norm, meant for zoos that mix architectures (see ``fu_score``).

Across a zoo, score = minmax(LP) * minmax(FU).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from medcurate.errors import MedcurateError
from medcurate.transfer.metrics import check_inputs, minmax, order_invariant

FU_BATCHES = 6
FU_VARIANTS = ("paper", "relative")
TRIPLET_MARGIN = 0.05


@order_invariant
def lp_score(features, labels, components: int = 50, neighbours: int = 5,
             seed: int = 42) -> float:
    """LP: NCA to ``components`` dimensions (fewer where the features have fewer), then the
    mean k-NN probability of the true class on the fitted points themselves, as published."""
    from sklearn.neighbors import KNeighborsClassifier, NeighborhoodComponentsAnalysis

    f, codes, _ = check_inputs(features, labels, "features")
    nca = NeighborhoodComponentsAnalysis(n_components=min(components, f.shape[1]),
                                         random_state=seed)
    embedded = nca.fit(f, codes).transform(f)
    knn = KNeighborsClassifier(n_neighbors=min(neighbours, codes.size)).fit(embedded, codes)
    return float(knn.predict_proba(embedded)[np.arange(codes.size), codes].mean())


def triplet_margin_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                        margin: float = TRIPLET_MARGIN) -> torch.Tensor | None:
    """Mean of the non-zero losses relu(d(a, p) - d(a, n) + margin) over all valid triplets
    (a != p of one class, n of another), on L2-normalised embeddings: the defaults of
    pytorch-metric-learning's ``TripletMarginLoss``, which the paper uses. None when no triplet
    has a non-zero loss (nothing to back-propagate)."""
    z = F.normalize(embeddings, dim=1)
    # Clamped before the square root: a zero distance (the diagonal) would give NaN gradients.
    distances = (2.0 - 2.0 * z @ z.T).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    valid = (same & ~eye)[:, :, None] & ~same[:, None, :]  # [anchor, positive, negative]
    losses = F.relu(distances[:, :, None] - distances[:, None, :] + margin)[valid]
    positive = losses > 0
    if not positive.any():
        return None
    return losses[positive].mean()


def fu_score(backbone: torch.nn.Module, first: str, second: str,
             batch_pixels: Callable[[np.ndarray], torch.Tensor], labels,
             embeddings: np.ndarray | None = None, chunk: int = 32,
             relative: bool = False) -> float:
    """FU of ``backbone`` (pooled features out, in eval mode) for the probe's images.

    ``first``/``second`` name the conv layers within ``backbone``; ``batch_pixels(indices)``
    returns the preprocessed images of those probe rows. Each batch's loss gradient with respect
    to its embeddings is computed first, then pushed back through the network ``chunk`` images
    at a time: the same gradient as one pass over the batch (eval mode: no batch statistics), in
    bounded memory, whatever the probe size. ``embeddings``, the probe's cached features where
    the caller has them, spare the forward pass that would recompute them.

    ``relative`` divides each layer's gradient norm by its weight's norm, ‖g‖/‖w‖, before the
    same mean over batches and ratio (the weights are fixed, so this is the paper's FU times
    ‖w_first‖/‖w_second‖). The paper's ‖g‖ grows with a layer's size and weight scale, which
    differ by architecture (a ViT's patch projection and qkv against a CNN's 3×3 convs), so
    its FU largely tells architectures apart. ‖g‖/‖w‖ = RMS(g)/RMS(w) is the layer's own
    relative movement under fine-tuning, ‖Δw‖/‖w‖ = η‖g‖/‖w‖ for an SGD step of rate η,
    whatever its parameter count. It does not undo every change of parametrisation: scaling
    the first layer by c where a normalisation follows leaves the network's function unchanged,
    divides its ‖g‖ by c and its ‖g‖/‖w‖ by c² (SGD's relative step really shrinks so), so the
    paper's FU grows by c and the relative one by c².
    """
    codes = torch.as_tensor(np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1))
    n = len(codes)
    size = n // FU_BATCHES
    if size < 3:
        raise MedcurateError(f"FU needs at least {3 * FU_BATCHES} probe images (batches of "
                             f"N/{FU_BATCHES} with triplets); the probe has {n}")
    layers = [backbone.get_submodule(name).weight for name in (first, second)]
    device = layers[0].device
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    for weight in layers:
        weight.requires_grad_(True)
    scales = [float(weight.detach().norm(p=2)) if relative else 1.0 for weight in layers]
    norms = []
    for start in range(0, n, size):
        rows = np.arange(start, min(start + size, n))
        pieces = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
        if embeddings is not None:
            embedded = torch.as_tensor(embeddings[rows], dtype=torch.float32, device=device)
        else:
            with torch.no_grad():
                embedded = torch.cat([backbone(batch_pixels(piece).to(device))
                                      for piece in pieces])
        embedded.requires_grad_(True)
        loss = triplet_margin_loss(embedded, codes[rows].to(device))
        if loss is None:  # no gradient at all: the batch adds nothing to either layer's mean
            continue
        (grad,) = torch.autograd.grad(loss, embedded)
        for weight in layers:
            weight.grad = None
        offset = 0
        for piece in pieces:
            backbone(batch_pixels(piece).to(device)).backward(grad[offset:offset + len(piece)])
            offset += len(piece)
        norms.append([float(weight.grad.norm(p=2)) / scale
                      for weight, scale in zip(layers, scales)])
    if not norms:
        raise MedcurateError("FU: no batch of the probe holds a triplet with a non-zero loss")
    first_norm, second_norm = np.mean(norms, axis=0)
    return float(second_norm / first_norm) if first_norm > 0 else float("nan")


def paper_score(lp, fu) -> np.ndarray:
    """The paper's score of each model: minmax(LP) * minmax(FU) across the models compared."""
    return minmax(lp) * minmax(fu)
