"""vefast.load_dinov2 / dinov2_features with a small randomly initialized timm DINOv2 (no downloads)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import vefast

SMALL = {"img_size": 56, "depth": 2}        # vit_small_patch14_dinov2, 2 blocks: fast on CPU


@pytest.fixture(scope="module")
def model():
    return vefast.load_dinov2("vit_small_patch14_dinov2", pretrained=False, **SMALL)


def test_model_is_frozen_dynamic_eval(model):
    assert not model.training and model.dynamic_img_size
    assert not any(p.requires_grad for p in model.parameters())


def test_match_grid_features_equal_manual_path(model):
    images = torch.rand(2, 3, 40, 60) * 2 - 1
    patch, cls = vefast.dinov2_features(model, images, grid=(3, 4))
    assert patch.shape == (2, 384, 3, 4) and cls.shape == (2, 384)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate(((images + 1) / 2 - mean) / std, size=(42, 56), mode="bilinear", align_corners=False)
    tokens = model.forward_features(x)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patch, tokens[:, 1:].reshape(2, 3, 4, 384).permute(0, 3, 1, 2))
    assert not patch.requires_grad


def test_vavae_choices_224_unnormalized(model):
    """VA-VAE (foundation_models.py): bilinear resize to 224, no normalization, tokens [:, 1:] as 16x16."""
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    patch, _ = vefast.dinov2_features(model, images, grid=(16, 16), resize="224", normalize=False)
    x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
    ref = model.forward_features(x)[:, 1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(patch, ref)
    with pytest.raises(ValueError, match="resize='224' gives a 16x16 patch grid"):
        vefast.dinov2_features(model, images, grid=(8, 8), resize="224")


def test_register_tokens_dropped():
    model = vefast.load_dinov2("vit_small_patch14_reg4_dinov2", pretrained=False, **SMALL)
    images = torch.rand(1, 3, 28, 28) * 2 - 1
    patch, cls = vefast.dinov2_features(model, images, grid=(2, 3))
    x = F.interpolate(((images + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                      / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), size=(28, 42), mode="bilinear",
                      align_corners=False)
    tokens = model.forward_features(x)
    assert model.num_prefix_tokens == 5
    torch.testing.assert_close(patch, tokens[:, 5:].reshape(1, 2, 3, -1).permute(0, 3, 1, 2))
    torch.testing.assert_close(cls, tokens[:, 0])


def test_local_checkpoint_no_network(tmp_path, model):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    for ckpt in (tmp_path, tmp_path / "model.safetensors", tmp_path / "ckpt.pth"):
        loaded = vefast.load_dinov2("vit_small_patch14_dinov2", checkpoint=ckpt, **SMALL)
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k]), k
    # a checkpoint at another image size: the position embedding is resampled
    other = vefast.load_dinov2("vit_small_patch14_dinov2", checkpoint=tmp_path, img_size=28, depth=2)
    assert other.pos_embed.shape[1] == 1 + 2 * 2


def test_missing_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vefast.load_dinov2("vit_small_patch14_dinov2", checkpoint=tmp_path / "nope.safetensors", **SMALL)
    with pytest.raises(FileNotFoundError, match="holds none of"):
        vefast.load_dinov2("vit_small_patch14_dinov2", checkpoint=tmp_path, **SMALL)
    torch.save({"blocks.0.nothing": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        vefast.load_dinov2("vit_small_patch14_dinov2", checkpoint=tmp_path / "bad.pth", **SMALL)
    with pytest.raises(ValueError, match="timm model name"):
        vefast.load_dinov2("not_a_model_at_all")

    def offline(*args, **kwargs):   # what timm raises when the hub cannot be reached (no download here)
        if kwargs.get("pretrained"):
            hub_calls.append(1)
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(*args, **kwargs)

    hub_calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    # without local weights: an immediate error saying how to provide them, and no hub access
    with pytest.raises(FileNotFoundError, match=r"no local weights .*checkpoint='DIR'.*download=True"):
        vefast.load_dinov2()
    assert not hub_calls
    # a download asked for, and the hub unreachable: the remedy
    with pytest.raises(RuntimeError, match="huggingface-cli download timm/vit_large_patch14_dinov2.lvd142m"):
        vefast.load_dinov2(download=True)
    assert hub_calls


def test_pretrained_weights_from_the_local_hub_cache(tmp_path, monkeypatch, model):
    """pretrained=True finds weights that the Hugging Face cache already holds (its snapshot layout)."""
    from safetensors.torch import save_file
    import huggingface_hub.constants

    repo = tmp_path / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = vefast.load_dinov2("vit_small_patch14_dinov2", **SMALL)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_unreadable_checkpoint_file_is_named(tmp_path):
    for name in ("junk.pth", "junk.safetensors"):
        (tmp_path / name).write_bytes(b"this is not a checkpoint at all")
        with pytest.raises(ValueError, match=rf"checkpoint '.*{name}' is not a readable"):
            vefast.load_dinov2("vit_small_patch14_dinov2", checkpoint=tmp_path / name, **SMALL)


def test_bad_feature_inputs(model):
    images = torch.rand(1, 3, 28, 28)
    with pytest.raises(ValueError, match="grid must be a pair"):
        vefast.dinov2_features(model, images, grid=(2,))
    with pytest.raises(ValueError, match="grid must be a pair"):
        vefast.dinov2_features(model, images, grid=(0, 2))
    with pytest.raises(ValueError, match="resize must be one of"):
        vefast.dinov2_features(model, images, grid=(2, 2), resize="256")
    with pytest.raises(TypeError, match="images must be a floating tensor"):
        vefast.dinov2_features(model, images.to(torch.uint8), grid=(2, 2))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        vefast.dinov2_features(model, images[:, :2], grid=(2, 2))
    with pytest.raises(ValueError, match="at least one non-empty image"):
        vefast.dinov2_features(model, images[:0], grid=(2, 2))
    with pytest.raises(ValueError, match="model's device"):
        vefast.dinov2_features(model, images.to("meta"), grid=(2, 2))
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        vefast.dinov2_features(torch.nn.Linear(2, 2), images, grid=(2, 2))
    fixed = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=1)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        vefast.dinov2_features(fixed, images, grid=(3, 3))


def test_features_feed_vf_loss(model):
    """End to end: DINOv2 features at the latent grid are valid vf_loss / ReaLS targets."""
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    patch, cls = vefast.dinov2_features(model, images, grid=(2, 2))
    z = torch.randn(2, 4, 2, 2, requires_grad=True)
    out = vefast.vf_loss(z, patch, torch.randn(384, 4) / 2)
    out.loss.backward()
    assert torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="feature grid"):
        vefast.vf_loss(torch.randn(2, 4, 3, 3), patch, torch.randn(384, 4))
