"""MAE model, its checkpoint contract, and pretraining on Ray Train with real chest X-rays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medcurate.config import IngestConfig
from medcurate.errors import MedcurateError
from medcurate.ingest import ingest
from medcurate.models.mae import build_mae, load_mae_encoder, save_checkpoint
from medcurate.models.preprocess import Preprocessing, preprocess_batch
from medcurate.train import PretrainConfig, pretrain
from medcurate.workspace import Workspace


def small_mae(**overrides):
    return build_mae("mae-vit-tiny", 32, 4, 1, depth=1, **overrides)


# -- unit ---------------------------------------------------------------------------------------
def test_masking_keeps_a_quarter_per_sample_and_is_seeded():
    model = small_mae()
    length = model.num_patches  # 64
    positions = torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(5, -1, 8)

    kept, mask, _ = model.random_masking(positions, 0.75, torch.Generator().manual_seed(3))
    assert kept.shape == (5, round(length * 0.25), 8)
    assert torch.all(mask.sum(dim=1) == length - round(length * 0.25))
    for b in range(5):  # the kept tokens are exactly the unmasked positions
        assert sorted(kept[b, :, 0].long().tolist()) == torch.where(mask[b] == 0)[0].tolist()
    assert not torch.equal(mask[0], mask[1])  # each sample draws its own mask

    again, same_mask, _ = model.random_masking(positions, 0.75, torch.Generator().manual_seed(3))
    other, other_mask, _ = model.random_masking(positions, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(kept, again) and torch.equal(mask, same_mask)
    assert not torch.equal(mask, other_mask)


def test_loss_is_finite_and_only_counts_masked_patches():
    torch.manual_seed(0)
    model = small_mae()
    images = torch.randn(4, 1, 32, 32)
    loss, pred, mask = model(images, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and pred.shape == (4, 64, 16) and mask.shape == (4, 64)

    visible_changed = pred + 100.0 * (1 - mask).unsqueeze(-1)
    masked_changed = pred + 100.0 * mask.unsqueeze(-1)
    assert torch.allclose(model.forward_loss(images, visible_changed, mask), loss)
    assert model.forward_loss(images, masked_changed, mask) > loss + 1.0

    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_checkpoint_round_trip_gives_identical_encoder_features(tmp_path):
    torch.manual_seed(1)
    model = small_mae(mean=[0.3], std=[0.2]).eval()
    path = tmp_path / "m" / "model.pt"
    save_checkpoint(model, path, {"note": "unit"})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left

    encoder, info = load_mae_encoder(path)
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(images), model.encoder_module()(images))
    assert info["embed_dim"] == 192 and encoder(images).shape == (3, 192)
    assert (info["img_size"], info["in_chans"], info["arch"]) == (32, 1, "mae-vit-tiny")
    assert info["mean"] == [pytest.approx(0.3)] and info["std"] == [pytest.approx(0.2)]
    assert info["meta"] == {"note": "unit"}
    assert not any(name.startswith("decoder") for name, _ in encoder.named_parameters())


def test_a_file_that_is_not_an_mae_checkpoint_is_refused(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path in (garbage, foreign, tmp_path / "missing.pt"):
        with pytest.raises(MedcurateError, match="MAE checkpoint"):
            load_mae_encoder(path)


def test_unknown_arch_and_bad_config_are_refused():
    with pytest.raises(MedcurateError, match="mae-vit-tiny, mae-vit-small"):
        build_mae("mae-vit-huge", 32, 4, 1)
    with pytest.raises(MedcurateError, match="multiple of patch_size"):
        build_mae("mae-vit-tiny", 30, 4, 1)
    assert PretrainConfig(collection="chest").model_name == "chest-mae-vit-tiny"
    for bad in (dict(img_size=30, patch_size=8), dict(in_chans=2), dict(epochs=0),
                dict(mask_ratio=1.0), dict(lr=-1.0), dict(unknown=1), dict(name="../x")):
        with pytest.raises(ValidationError):
            PretrainConfig(collection="chest", **bad)


# -- end to end: Ray Data + Ray Train on real images ---------------------------------------------
def _features(encoder, images: np.ndarray, info: dict) -> np.ndarray:
    pixels = preprocess_batch(list(images), Preprocessing(info["img_size"], info["in_chans"],
                                                          info["mean"], info["std"]))
    encoder.eval()
    with torch.no_grad():
        return torch.cat([encoder(torch.from_numpy(pixels[i:i + 512]))
                          for i in range(0, len(pixels), 512)]).numpy()


def _probe_auc(train_x, train_y, test_x, test_y) -> float:
    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(max_iter=5000).fit(scaler.transform(train_x), train_y)
    return roc_auc_score(test_y, probe.predict_proba(scaler.transform(test_x))[:, 1])


def _probes(encoder, data, info) -> tuple[float, float]:
    """Test AUC of a probe on the whole train split, and the mean over 10 probes on 40 labels."""
    train_x = _features(encoder, data["train_images"], info)
    test_x = _features(encoder, data["test_images"], info)
    train_y, test_y = data["train_labels"][:, 0], data["test_labels"][:, 0]
    full = _probe_auc(train_x, train_y, test_x, test_y)
    rng, few = np.random.default_rng(0), []
    for _ in range(10):
        chosen = np.concatenate([rng.choice(np.flatnonzero(train_y == c), 20, replace=False)
                                 for c in (0, 1)])
        few.append(_probe_auc(train_x[chosen], train_y[chosen], test_x, test_y))
    return full, float(np.mean(few))


@pytest.mark.slow
def test_pretraining_beats_the_same_network_at_random_init(ray_session, shared_data, tmp_path):
    """PneumoniaMNIST, not BreastMNIST: BreastMNIST's 156 test images (42 malignant) made the
    probe gap swing from -0.01 to +0.05 AUC between epochs, while PneumoniaMNIST's is stable."""
    pneumonia = shared_data / "pneumoniamnist" / "pneumoniamnist.npz"
    workspace = Workspace(str(tmp_path / "ws"))
    ingest(IngestConfig(source=str(pneumonia), name="pneumonia"), workspace)
    # 7-pixel patches (16 tokens) and 4 blocks keep ~730 steps within about two CPU minutes.
    config = PretrainConfig(collection="pneumonia", img_size=28, patch_size=7, depth=4,
                            epochs=10, batch_size=64, seed=0)
    result = pretrain(config, workspace)

    model_dir = Path(workspace.require("models", "pneumonia-mae-vit-tiny"))
    assert result["checkpoint"] == str(model_dir / "model.pt")
    assert result["images"] == 4682 and result["epochs"] == 10  # the train split only
    assert result["losses"][-1] < 0.6 * result["losses"][0]
    provenance = json.loads((model_dir / "provenance.json").read_text())
    assert provenance["kind"] == "model" and provenance["seed"] == 0
    assert provenance["inputs"][0]["sha256"] == \
        workspace.provenance("collections", "pneumonia")["outputs"]["manifest.parquet"]["sha256"]
    assert not any((tmp_path / "ws" / "jobs").iterdir())  # Ray checkpoints removed once published

    encoder, info = load_mae_encoder(result["checkpoint"])
    torch.manual_seed(config.seed)  # the training loop's own seed: its exact starting weights
    random_init = build_mae(config.arch, 28, 7, 1, depth=4).encoder_module()
    data = np.load(pneumonia)
    pretrained_full, pretrained_few = _probes(encoder, data, info)
    random_full, random_few = _probes(random_init, data, info)
    print(f"linear probe test AUC, pretrained vs random init: full train split "
          f"{pretrained_full:.4f} vs {random_full:.4f}; 40 labels "
          f"{pretrained_few:.4f} vs {random_few:.4f}")
    # Gaps measured with this recipe over seeds 0-2, through pretrain() (and, in brackets, in a
    # plain-torch loop with the same model and schedule): full train split +0.032, +0.031,
    # +0.018 (+0.028, +0.028, +0.011) AUC; 40 labels +0.098, +0.112, +0.087 (+0.106, +0.113,
    # +0.080). The margins asserted sit below the smallest of these.
    assert pretrained_full > random_full + 0.005
    assert pretrained_few > random_few + 0.04


def test_cli_architecture_choices_match_the_model_registry():
    """The config lists the MAE architectures without importing torch; keep it in step."""
    import typing

    from medcurate.config import MaeArch
    from medcurate.models.mae import ARCHS

    assert set(typing.get_args(MaeArch)) == set(ARCHS)
