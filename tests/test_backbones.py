"""Backbone building and weight loading, on tiny random-init ViTs."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from strata.models.backbones import BackboneError, build_backbone


def test_tiny_is_deterministic_and_labelled_random(tiny_backbone_factory):
    a, b = tiny_backbone_factory(), tiny_backbone_factory()
    assert a.info.random_init and "RANDOM-INIT" in a.info.label
    assert a.info.fingerprint == b.info.fingerprint
    assert not any(p.requires_grad for p in a.parameters())


def test_feature_is_cls_after_final_norm(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    x = torch.rand(3, 3, 32, 32)
    tokens = backbone.vit.norm(backbone.vit.blocks(backbone.vit._pos_embed(backbone.vit.patch_embed(x))))
    torch.testing.assert_close(backbone(x), tokens[:, 0])
    assert backbone(x).shape == (3, backbone.embed_dim)


def test_local_safetensors_weights_load(tmp_path, tiny_backbone_factory):
    source = tiny_backbone_factory()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.vit.state_dict().items()}, str(path))
    loaded = build_backbone("tiny", weights=path)
    assert loaded.info.source == f"file:{path}"
    assert not loaded.info.random_init
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), source(x))


def test_pth_weights_load_without_pickle_objects(tmp_path, tiny_backbone_factory):
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": tiny_backbone_factory().vit.state_dict()}, path)
    assert build_backbone("tiny", weights=path).info.fingerprint == tiny_backbone_factory().info.fingerprint


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(BackboneError, match="cannot read weights file"):
        build_backbone("tiny", weights=path)


def test_wrong_architecture_weights_are_refused(tmp_path, tiny_backbone_factory):
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone_factory("tiny-wide").vit.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="does not fit backbone 'tiny'"):
        build_backbone("tiny", weights=path)


def test_missing_weights_file_says_how_to_provide_it(tmp_path):
    with pytest.raises(BackboneError, match="does not exist.*--weights"):
        build_backbone("tiny", weights=tmp_path / "absent.safetensors")


def test_offline_pretrained_fails_with_both_options():
    with pytest.raises(BackboneError, match="--weights PATH.*hub cache"):
        build_backbone("vit_tiny_patch16_224.augreg_in21k")


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(BackboneError, match="unknown backbone 'resnet9000'.*tiny.*vit_base_patch16_224"):
        build_backbone("resnet9000")


def test_vit_base_built_without_weights_has_768_features():
    backbone = build_backbone("vit_base_patch16_224.augreg_in21k", pretrained=False)
    assert backbone.embed_dim == 768 and backbone.info.depth == 12 and backbone.info.random_init
