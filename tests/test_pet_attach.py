"""The shared PET attachment mechanism: hooks, prefix attention, detach, export."""

import pytest
import torch
from torch import nn

from strata.models.pet.attach import Attachment, adapted_blocks
from strata.models.pet.prefix import PrefixAttention, attach_prefix


class FixedPrefix(nn.Module):
    def __init__(self, length, dim, scale=1.0):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(length, dim) * scale)
        self.values = nn.Parameter(torch.randn(length, dim) * scale)

    def forward(self, batch_size):
        return self.keys.expand(batch_size, -1, -1), self.values.expand(batch_size, -1, -1)


def _attention_reference(attn, x, prefix_k, prefix_v, start, compensate):
    """The official computation written out: explicit softmax, prefix mass renormalised."""
    B, N, D = x.shape
    H, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    pk = prefix_k.reshape(B, -1, H, hd).transpose(1, 2)
    pv = prefix_v.reshape(B, -1, H, hd).transpose(1, 2)
    k = torch.cat([k[:, :, :start], pk, k[:, :, start:]], 2)
    v = torch.cat([v[:, :, :start], pv, v[:, :, start:]], 2)
    a = (q @ k.transpose(-2, -1) * hd**-0.5).softmax(-1)
    L = pk.shape[2]
    if compensate:
        lam = a[..., start : start + L].sum(-1, keepdim=True)
        a = a.clone()
        a[..., start : start + L] /= lam
    return attn.proj((a @ v).transpose(1, 2).reshape(B, N, D)), a


@pytest.mark.parametrize("position,start", [("front", 0), ("after_cls", 1)])
@pytest.mark.parametrize("compensate", [False, True])
def test_prefix_attention_matches_reference(tiny_backbone_factory, position, start, compensate):
    backbone = tiny_backbone_factory()
    attn = backbone.blocks[0].attn
    prefix = FixedPrefix(3, backbone.embed_dim)
    x = torch.randn(2, 65, backbone.embed_dim)
    expected, weights = _attention_reference(attn, x, *prefix(2), start, compensate)
    got = PrefixAttention(attn, prefix, position, compensate)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    prefix_mass = weights[..., start : start + 3].sum(-1)
    rest = weights.sum(-1) - prefix_mass
    if compensate:
        torch.testing.assert_close(prefix_mass, torch.ones_like(prefix_mass))  # prefix sums to 1
        assert (rest < 1).all()  # the others keep 1 − λ
    else:
        torch.testing.assert_close(prefix_mass + rest, torch.ones_like(rest))  # plain softmax


def test_attach_keeps_state_keys_and_detach_restores(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    keys = list(backbone.state_dict())
    x = torch.rand(2, 3, 32, 32)
    before = backbone(x)
    attachment = Attachment()
    prefix = FixedPrefix(4, backbone.embed_dim)
    attach_prefix(attachment, backbone.blocks[1], prefix, "front", False)
    attachment.add_output(backbone.blocks[0].mlp, lambda h: torch.ones_like(h))
    assert list(backbone.state_dict()) == keys  # prefix not registered, same timm submodules
    assert not torch.allclose(backbone(x), before)
    attachment.detach()
    assert not attachment.attached
    torch.testing.assert_close(backbone(x), before, rtol=0, atol=0)


def test_adapted_blocks_are_clipped_to_depth():
    assert adapted_blocks(4, [0, 1, 2, 3, 4]) == [0, 1, 2, 3]
    assert adapted_blocks(12, [0, 1, 2, 3, 4]) == [0, 1, 2, 3, 4]


def test_hooked_and_prefixed_backbone_exports_to_onnx(tmp_path, tiny_backbone_factory):
    import onnxruntime as ort

    backbone = tiny_backbone_factory()
    attachment = Attachment()
    attach_prefix(attachment, backbone.blocks[0], FixedPrefix(2, backbone.embed_dim), "after_cls", True)
    scale = nn.Parameter(torch.full((backbone.embed_dim,), 1.5))
    attachment.forward_hook(backbone.blocks[1].mlp, lambda _m, _a, out: out * scale)
    x = torch.rand(2, 3, 32, 32)
    path = tmp_path / "m.onnx"
    torch.onnx.export(backbone.eval(), (x,), str(path), dynamo=True, dynamic_shapes=({0: "batch"},), opset_version=18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), backbone(x), rtol=1e-4, atol=1e-4)
