"""The one PET contract: every PET attaches through ``attach(backbone, attachment)`` and leaves no trace once
detached, so methods run one after another on ONE backbone learn exactly what each learns alone."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from strata.models.engine import Engine, seed_everything
from strata.models.methods import create_method
from strata.models.methods.aper import AperConfig, build_pet
from strata.models.pet.adapter import BottleneckAdapter
from strata.models.pet.attach import PET, PETList, attached
from strata.models.pet.lae_pets import build_pet as build_lae_pet
from strata.models.pet.oneprompt import OnePrompt
from strata.models.pet.prefix import PrefixAttention

APER_PETS = ["adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune"]
LAE_PETS = ["adapter", "lora", "prefix"]


def _randomise(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def _all_pets(backbone):
    pets = {f"aper_{kind}": build_pet(AperConfig(pet=kind), backbone) for kind in APER_PETS}
    for kind in LAE_PETS:
        pets[f"lae_{kind}"] = PETList(build_lae_pet(kind, backbone.embed_dim, block=b) for b in (0, 2))
    pets["oneprompt"] = OnePrompt(backbone)
    return pets


def test_every_pet_has_the_one_attach_signature_and_leaves_no_trace(tiny_backbone_factory):
    backbone, fresh = tiny_backbone_factory(), tiny_backbone_factory()
    x = torch.rand(2, 3, 32, 32)
    pets = _all_pets(backbone)
    plain = backbone(x)
    torch.testing.assert_close(plain, fresh(x), rtol=0, atol=0)  # building a PET attaches nothing
    keys = list(backbone.state_dict())
    for name, pet in pets.items():
        assert isinstance(pet, PET), name
        assert list(inspect.signature(pet.attach).parameters) == ["backbone", "attachment"], name
        _randomise(pet)
        with attached(backbone, pet):
            assert not torch.allclose(backbone(x), plain), name  # attached, it changes the features
        torch.testing.assert_close(backbone(x), plain, rtol=0, atol=0)
        assert list(backbone.state_dict()) == keys, name
        assert not any(isinstance(b.attn, PrefixAttention) for b in backbone.blocks), name


def test_a_failing_attach_undoes_what_it_did(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    x = torch.rand(2, 3, 32, 32)
    plain = backbone(x)
    prompt = OnePrompt(backbone)
    beyond = build_lae_pet("lora", backbone.embed_dim, block=len(backbone.blocks))  # no such block
    with pytest.raises(IndexError), attached(backbone, prompt, beyond):
        pass
    torch.testing.assert_close(backbone(x), plain, rtol=0, atol=0)


@pytest.mark.parametrize("order", [["ovor", "lae_prefix", "aper_adapter", "simplecil"], ["lae_adapter", "ovor"]])
def test_methods_in_sequence_on_one_backbone_learn_what_each_learns_alone(
    order, tiny_backbone_factory, synthetic_stream
):
    shared = tiny_backbone_factory()
    task = synthetic_stream.tasks[0]
    x = torch.rand(3, 3, 32, 32)
    overrides = {
        "ovor": {"train": {"epochs": 2, "batch_size": 8}, "vor_epochs": 1, "outliers": {"num_per_class": 4}},
        "lae_prefix": {"train": {"epochs": 1, "batch_size": 6}},
        "lae_adapter": {"train": {"epochs": 1, "batch_size": 6}},
        "aper_adapter": {"train": {"epochs": 1, "batch_size": 8}},
    }

    def learned(name, backbone):
        seed_everything(0)
        method = create_method(name, backbone, overrides=overrides.get(name))
        method.learn(task, Engine("cpu", seed=0, show_progress=False))
        with torch.no_grad():
            return method.state_tensors(), method.eval()(x)

    for name in order:
        state, outputs = learned(name, shared)
        alone_state, alone_outputs = learned(name, tiny_backbone_factory())
        assert list(state) == list(alone_state), name
        for key, value in state.items():
            assert torch.equal(value, alone_state[key]), (name, key)
        torch.testing.assert_close(outputs, alone_outputs, rtol=0, atol=0)
        torch.testing.assert_close(shared(x), tiny_backbone_factory()(x), rtol=0, atol=0)  # no PET left behind


def test_the_adapter_options_give_lae_and_adaptformer_with_their_stored_keys(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    block = backbone.blocks[1]
    lae = build_lae_pet("adapter", backbone.embed_dim, block=1)
    aper = build_pet(AperConfig(pet="adapter"), backbone).adapters[1]
    assert isinstance(lae, BottleneckAdapter) and isinstance(aper, BottleneckAdapter)
    assert list(lae.state_dict()) == ["down.weight", "down.bias", "up.weight", "up.bias", "scaler.scale"]
    assert list(aper.state_dict()) == ["down.weight", "down.bias", "up.weight", "up.bias"]  # fixed scale
    assert (lae.down.out_features, aper.down.out_features) == (5, 64)
    assert lae.scaler.scale.requires_grad and lae.scaler.scale.item() == 1.0 and aper.scaler.scale == 0.1
    _randomise(lae)
    tokens = torch.randn(2, 65, backbone.embed_dim) * 3 + 1

    with attached(backbone, lae):  # LAE: GELU, learnable scale, parallel to the attention on LN1(x)
        out = block(tokens)
    h = block.norm1(tokens)
    mid = tokens + block.attn(h) + lae.scaler.scale * lae.up(F.gelu(lae.down(h)))
    torch.testing.assert_close(out, mid + block.mlp(block.norm2(mid)))

    _randomise(aper)
    aper.train()  # AdaptFormer: ReLU, 0.1, dropout 0.1 on the bottleneck, parallel to the MLP on pre-LN2 x
    with attached(backbone, aper):
        first, second = block(tokens), block(tokens)
    assert not torch.allclose(first, second)  # dropout is active in training
    aper.eval()
    with attached(backbone, aper):
        out = block(tokens)
    mid = tokens + block.attn(block.norm1(tokens))
    torch.testing.assert_close(out, mid + block.mlp(block.norm2(mid)) + 0.1 * aper.up(F.relu(aper.down(mid))))


def test_backbone_pieces_compose_to_its_forward(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    x = torch.rand(2, 3, 32, 32)
    expected = backbone(x)
    tokens = backbone.embed(x)
    assert tokens.shape == (2, 1 + (32 // 4) ** 2, backbone.embed_dim)  # CLS + patches, position-embedded
    for split in range(len(backbone.blocks) + 1):
        early = backbone.run_blocks(tokens, stop=split)
        got = backbone.final_feature(backbone.run_blocks(early, start=split))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_num_old_counts_the_classes_before_the_current_task(tiny_backbone_factory, synthetic_stream):
    method = create_method("simplecil", tiny_backbone_factory())
    assert method.num_old == 0
    seen = []
    for task in synthetic_stream.tasks:
        method.begin_task(task)
        seen.append(method.num_old)
    assert seen == [task.num_old for task in synthetic_stream.tasks] == [0, 2, 4]
