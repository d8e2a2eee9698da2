"""LAE: PET definitions, freeze schedule, EMA, ensemble, shared early blocks, state, export, bad input."""

import pytest
import torch
from pydantic import ValidationError

from strata.models.methods import StateError, UnknownMethodError, create_method, method_config
from strata.models.pet.attach import Attachment, attached
from strata.models.pet.lae_pets import KVLoRA, build_pet
from strata.models.pet.prefix import PrefixAttention

VARIANTS = ["lae_adapter", "lae_lora", "lae_prefix"]
FAST = {"train": {"batch_size": 6, "epochs": 1}}  # synthetic tasks hold 18 images


def _method(backbone, name="lae_adapter", **overrides):
    return create_method(name, backbone, overrides={**FAST, **overrides})


def _perturb(pets, seed=0):
    """Give PETs non-trivial values (fresh Adapter/LoRA are exact identities)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pets.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def _begin(method, stream, count):
    for task in list(stream)[:count]:
        method.begin_task(task)


@pytest.mark.parametrize("name", ["lae_adapter", "lae_lora"])
def test_zero_init_pets_leave_the_vit_unchanged(tiny_backbone_factory, name):
    backbone = tiny_backbone_factory()
    method = _method(backbone, name)
    x = torch.rand(3, 3, 32, 32)
    (features,) = method.expert_features(x, [method.online])
    torch.testing.assert_close(features, backbone(x), rtol=0, atol=0)


def test_lora_changes_only_key_and_value_rows(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    qkv = backbone.blocks[0].attn.qkv
    lora = KVLoRA(backbone.embed_dim, block=0)
    _perturb(lora)
    x = torch.randn(2, 65, backbone.embed_dim)
    before = qkv(x)
    attachment = Attachment()
    lora.attach(backbone, attachment)
    delta = qkv(x) - before
    attachment.detach()
    D = backbone.embed_dim
    assert torch.equal(delta[..., :D], torch.zeros_like(delta[..., :D]))  # Q untouched, exactly
    assert delta[..., D : 2 * D].abs().max() > 0
    assert delta[..., 2 * D :].abs().max() > 0
    torch.testing.assert_close(qkv(x), before, rtol=0, atol=0)  # detached again


@pytest.mark.parametrize("overrides,expected", [({}, True), ({"compensate": False}, False)])
def test_prefix_is_after_cls_and_compensated_by_default(tiny_backbone_factory, overrides, expected):
    backbone = tiny_backbone_factory()
    method = _method(backbone, "lae_prefix", **overrides)
    with attached(backbone, method.online):
        attentions = [backbone.blocks[i].attn for i in method.adapted]
        assert all(isinstance(a, PrefixAttention) for a in attentions)
        assert {(a.position, a.compensate) for a in attentions} == {("after_cls", expected)}
        assert attentions[0].prefix(2)[0].shape == (2, 10, backbone.embed_dim)
    assert not isinstance(backbone.blocks[0].attn, PrefixAttention)


def test_prefix_tokens_init_uniform_small():
    pet = build_pet("prefix", 768, block=0)
    for tokens in (pet.keys, pet.values):
        assert tokens.shape == (10, 768) and 0 <= tokens.min() and tokens.max() <= 0.01


@pytest.fixture(scope="module")
def vit_b():
    from strata.models.backbones import build_backbone

    return build_backbone("vit_base_patch16_224.augreg_in21k", pretrained=False)


@pytest.mark.parametrize("name,count", [("lae_adapter", 42_270), ("lae_lora", 76_810), ("lae_prefix", 76_810)])
def test_parameter_counts_on_vit_b16(vit_b, name, count):
    method = create_method(name, vit_b)
    assert method.adapted == [0, 1, 2, 3, 4]
    assert sum(p.numel() for p in method.online.parameters()) == count


def test_offline_copy_at_task_1_and_ema_update(tiny_backbone_factory, synthetic_stream):
    method = _method(tiny_backbone_factory(), "lae_lora")
    _begin(method, synthetic_stream, 1)
    assert method.offline is None
    method.on_optimizer_step()  # no offline expert yet: nothing to do
    _perturb(method.online)
    method.begin_task(list(synthetic_stream)[1])
    for on, off in zip(method.online.state_dict().values(), method.offline.state_dict().values(), strict=True):
        assert torch.equal(on, off)  # a copy of the online PET as trained on task 0
    assert not any(p.requires_grad for p in method.offline.parameters())
    _perturb(method.online, seed=1)
    off_before = {k: v.clone() for k, v in method.offline.state_dict().items()}
    method.on_optimizer_step()
    online = method.online.state_dict()
    assert any(k.endswith("scale") for k in online)  # the learnable scalars are EMA'd as well
    for key, off in method.offline.state_dict().items():
        torch.testing.assert_close(off, 0.9999 * off_before[key] + 0.0001 * online[key], rtol=0, atol=0)


def test_freeze_schedule_and_old_heads_fixed(tiny_backbone_factory, synthetic_stream, engine):
    method = _method(tiny_backbone_factory(), "lae_adapter", train={"batch_size": 6, "epochs": 2}, freeze_epochs=1)
    seen = []
    original = method.on_epoch_start

    def record(epoch):
        original(epoch)
        seen.append((method.task_index, epoch, all(p.requires_grad for p in method.online.parameters())))

    method.on_epoch_start = record
    tasks = list(synthetic_stream)
    method.learn(tasks[0], engine)
    head0 = {k: v.clone() for k, v in method.heads[0].state_dict().items()}
    online0 = {k: v.clone() for k, v in method.online.state_dict().items()}
    method.learn(tasks[1], engine)
    assert seen == [(0, 0, True), (0, 1, True), (1, 0, False), (1, 1, True)]
    for key, value in method.heads[0].state_dict().items():
        assert torch.equal(value, head0[key])  # bit-identical
    assert any(not torch.equal(v, online0[k]) for k, v in method.online.state_dict().items())  # trained again
    assert any(not torch.equal(v, online0[k]) for k, v in method.offline.state_dict().items())  # accumulated
    assert [method.pets_frozen(t, e) for t in (0, 5) for e in (0, 1)] == [False, False, True, False]


def test_frozen_epochs_keep_online_fixed_while_ema_runs(tiny_backbone_factory, synthetic_stream, engine):
    method = _method(tiny_backbone_factory(), "lae_prefix", freeze_epochs=3)
    tasks = list(synthetic_stream)
    method.learn(tasks[0], engine)
    online0 = {k: v.clone() for k, v in method.online.state_dict().items()}
    calls = []
    method.on_optimizer_step = (lambda step: lambda: (calls.append(1), step()))(method.on_optimizer_step)
    method.learn(tasks[1], engine)  # 1 epoch < freeze_epochs: PETs frozen throughout
    assert len(calls) == 3  # 18 images / batch 6
    for key, value in method.online.state_dict().items():
        assert torch.equal(value, online0[key])


def test_ensemble_is_max_of_softmaxes(tiny_backbone_factory, synthetic_stream):
    method = _method(tiny_backbone_factory())
    on = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    off = torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 2.9, 0.0, 0.0]])
    method.logits = lambda features: features
    method.expert_features = lambda pixels, experts: [on, off][: len(experts)]
    _begin(method, synthetic_stream, 1)
    torch.testing.assert_close(method(torch.zeros(2)), on.softmax(1))  # task 0: online only
    _begin(method, list(synthetic_stream)[1:], 1)
    probabilities = method(torch.zeros(2))
    torch.testing.assert_close(probabilities, torch.maximum(on.softmax(1), off.softmax(1)))
    assert probabilities.argmax(1).tolist() == [2, 1]  # row 0: the offline expert's confident class wins


def test_early_blocks_run_once_for_both_experts(tiny_backbone_factory, synthetic_stream):
    backbone = tiny_backbone_factory()
    method = _method(backbone, "lae_adapter", adapt_blocks=[2, 3])
    _begin(method, synthetic_stream, 2)
    _perturb(method.online)
    _perturb(method.offline, seed=1)
    calls = {}
    for name, module in [("embed", backbone.vit.patch_embed), *((f"b{i}", b) for i, b in enumerate(backbone.blocks))]:
        calls[name] = 0
        module.register_forward_hook(lambda *_a, name=name: calls.__setitem__(name, calls[name] + 1))
    x = torch.rand(4, 3, 32, 32)
    got = method(x)
    assert calls == {"embed": 1, "b0": 1, "b1": 1, "b2": 2, "b3": 2}
    expected = []
    for pets in (method.online, method.offline):  # the naive way: two full forwards
        with attached(backbone, pets):
            expected.append(method.logits(backbone(x)).softmax(1))
    torch.testing.assert_close(got, torch.maximum(*expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_state_round_trip(tmp_path, tiny_backbone_factory, synthetic_stream, engine, name):
    method = _method(tiny_backbone_factory(), name, freeze_epochs=0)
    for task in list(synthetic_stream)[:2]:
        method.learn(task, engine)
    _perturb(method.offline)  # make the experts clearly differ
    method.save_state(tmp_path / "state")
    restored = _method(tiny_backbone_factory(), name, freeze_epochs=0)
    restored.load_state(tmp_path / "state")
    assert set(restored.state_tensors()) == set(method.state_tensors())
    assert any(k.startswith("offline.") for k in restored.state_tensors())
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), method.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lae_adapter", "lae_prefix"])  # hooked and swapped attachments
def test_onnx_export_holds_both_experts_and_the_max(tmp_path, tiny_backbone_factory, synthetic_stream, name):
    import onnx
    import onnxruntime as ort

    method = _method(tiny_backbone_factory(), name)
    _begin(method, synthetic_stream, 2)
    _perturb(method.online)
    _perturb(method.offline, seed=1)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = method.eval()(x)
    path = tmp_path / "lae.onnx"
    torch.onnx.export(
        method.export_module(), (x,), str(path), dynamo=True, dynamic_shapes=({0: "batch"},), opset_version=18
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x[:2].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected[:2], rtol=1e-4, atol=1e-4)
    assert "Max" in {node.op_type for node in onnx.load(str(path)).graph.node}  # the ensemble is in the graph
    assert not any(isinstance(b.attn, PrefixAttention) for b in method.backbone.blocks)  # export left it clean


def test_bad_input_fails_loudly(tmp_path, tiny_backbone_factory, synthetic_stream):
    with pytest.raises(UnknownMethodError, match="lae_adapter"):
        create_method("lae_bogus", tiny_backbone_factory())
    with pytest.raises(ValidationError):
        method_config("lae_adapter", {"pet": "bogus"})
    with pytest.raises(ValueError, match="none of the blocks"):
        _method(tiny_backbone_factory(), adapt_blocks=[7, 8])
    method = _method(tiny_backbone_factory())
    _begin(method, synthetic_stream, 2)
    method.save_state(tmp_path / "lae")
    simplecil = create_method("simplecil", tiny_backbone_factory())
    simplecil.begin_task(list(synthetic_stream)[0])
    simplecil.save_state(tmp_path / "simplecil")
    with pytest.raises(StateError, match="simplecil"):
        _method(tiny_backbone_factory()).load_state(tmp_path / "simplecil")
    with pytest.raises(StateError, match="lae_adapter"):
        _method(tiny_backbone_factory(), "lae_lora").load_state(tmp_path / "lae")
    with pytest.raises(StateError, match="backbone"):  # width mismatch: another ViT
        _method(tiny_backbone_factory("tiny-wide")).load_state(tmp_path / "lae")
