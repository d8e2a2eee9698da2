"""APER/ADAM: PET mechanisms (AdaptFormer, VPT, SSF), the merge, prototypes, state and export."""

import numpy as np
import pytest
import torch

from strata.models.backbones import BackboneError, build_backbone, weights_fingerprint
from strata.models.heads import class_means
from strata.models.methods import StateError, UnknownMethodError, create_method, method_config
from strata.models.methods.aper import AperConfig, build_pet, parameter_count
from strata.models.pet.adaptformer import AdaptFormer
from strata.models.pet.attach import attached
from strata.models.pet.ssf import SSF
from strata.models.pet.vpt import VisualPrompts

VARIANTS = ["aper_adapter", "aper_ssf", "aper_vpt_shallow", "aper_vpt_deep", "aper_finetune"]
FAST = {"train": {"epochs": 1, "batch_size": 8}}


def _randomise(module: torch.nn.Module, std: float = 0.05) -> None:
    """Move every parameter off its (often no-op) init so a wrong wiring shows up in the outputs."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def _tokens(backbone, x):
    return backbone.embed(x)


# -- PET mechanisms ------------------------------------------------------------------------------
def test_adapter_with_zero_up_projection_leaves_features_unchanged(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    adapter = AdaptFormer(backbone).train()  # dropout active: still an exact no-op at init
    x = torch.rand(3, 3, 32, 32)
    with attached(backbone, adapter):
        adapted = backbone(x)
    torch.testing.assert_close(adapted, backbone(x), rtol=0, atol=0)
    assert all(not torch.any(a.up.weight) for a in adapter.adapters)


def test_adapter_reads_the_residual_stream_before_norm2(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    adapter = AdaptFormer(backbone).eval()
    _randomise(adapter, std=0.2)
    block, branch = backbone.blocks[0], adapter.adapters[0]
    tokens = torch.randn(2, 65, backbone.embed_dim) * 3 + 1  # far from LN-normalised statistics
    with attached(backbone, adapter):
        out = block(tokens)
    mid = tokens + block.attn(block.norm1(tokens))
    expected = mid + block.mlp(block.norm2(mid)) + 0.1 * branch.up(torch.relu(branch.down(mid)))
    reading_ln2 = mid + block.mlp(block.norm2(mid)) + 0.1 * branch.up(torch.relu(branch.down(block.norm2(mid))))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, reading_ln2, atol=1e-3)


def test_adapter_is_detached_after_use(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    keys = set(backbone.state_dict())
    with attached(backbone, AdaptFormer(backbone)):
        assert backbone.blocks[0].mlp._forward_hooks
    assert not backbone.blocks[0].mlp._forward_hooks and not backbone.blocks[0].norm2._forward_pre_hooks
    assert set(backbone.state_dict()) == keys


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_tokens_are_appended_at_the_end_and_removed(deep, tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    prompts = VisualPrompts(backbone, num_tokens=5, deep=deep)
    assert not torch.any(prompts.prompts)  # zero init
    _randomise(prompts)
    x = torch.rand(2, 3, 32, 32)
    plain = _tokens(backbone, x)
    seen = []
    # observers registered after the PET's hooks see what the modules see
    with attached(backbone, prompts):
        hooks = [
            m.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
            for m in [*backbone.blocks, backbone.vit.norm]
        ]
        features = backbone.forward_features(x)
    for hook in hooks:
        hook.remove()
    n = plain.shape[1]
    assert features.shape[1] == n and seen[-1].shape[1] == n  # removed before the final norm
    assert all(t.shape[1] == n + 5 for t in seen[:-1])
    torch.testing.assert_close(seen[0][:, :n], plain)  # the original sequence comes first
    for i, block_input in enumerate(seen[:-1]):
        if deep or i == 0:  # deep: a fresh set before every block; shallow: only the input set
            torch.testing.assert_close(block_input[:, n:], prompts.prompts[i if deep else 0].expand(2, -1, -1))
    if not deep:  # shallow prompts are carried through the blocks, not re-inserted
        assert not torch.allclose(seen[1][:, n:], prompts.prompts[0].expand(2, -1, -1))


def test_vpt_with_zero_prompts_still_changes_features(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    x = torch.rand(2, 3, 32, 32)
    with attached(backbone, VisualPrompts(backbone, deep=True)):
        prompted = backbone(x)
    assert not torch.allclose(prompted, backbone(x))


def test_ssf_modulates_every_site_and_is_identity_at_unit_scale(tiny_backbone_factory):
    backbone = tiny_backbone_factory()
    ssf = SSF(backbone)
    x = torch.rand(2, 3, 32, 32)
    plain = backbone(x)
    with torch.no_grad():
        for factor in ssf.factors.values():
            factor.scale.fill_(1.0)
            factor.shift.zero_()
    with attached(backbone, ssf):
        torch.testing.assert_close(backbone(x), plain)
    assert len(ssf.factors) == 2 + 6 * len(backbone.blocks)
    site = ssf.factors["blocks_1_attn_qkv"]
    assert site.scale.shape == (3 * backbone.embed_dim,)
    with torch.no_grad():
        site.shift.fill_(1.0)
    with attached(backbone, ssf):
        assert not torch.allclose(backbone(x), plain)


@pytest.fixture(scope="module")
def vit_b16():
    return build_backbone("vit_base_patch16_224.augreg_in21k", pretrained=False)


@pytest.mark.parametrize(
    "pet, expected", [("adapter", 1_189_632), ("ssf", 205_824), ("vpt_deep", 46_080), ("vpt_shallow", 3_840)]
)
def test_pet_parameter_counts_on_vit_b16(pet, expected, vit_b16):
    assert parameter_count(build_pet(AperConfig(pet=pet), vit_b16)) == expected


# -- the method ----------------------------------------------------------------------------------
def test_variants_aliases_and_defaults():
    defaults = {name: method_config(name) for name in VARIANTS}
    assert method_config("adam_vpt_deep") == defaults["aper_vpt_deep"]
    recipe = {
        n: (c.train.optimizer.lr, c.train.optimizer.weight_decay, c.train.batch_size, c.train.epochs)
        for n, c in defaults.items()
    }
    assert recipe == {
        "aper_adapter": (0.01, 5e-4, 48, 20),
        "aper_ssf": (0.01, 5e-4, 48, 20),
        "aper_vpt_shallow": (0.01, 5e-4, 48, 20),
        "aper_vpt_deep": (0.05, 5e-4, 16, 5),
        "aper_finetune": (0.01, 5e-4, 128, 5),
    }
    for config in defaults.values():
        opt = config.train.optimizer
        assert (opt.name, opt.momentum, opt.schedule, opt.min_lr) == ("sgd", 0.9, "cosine", 0.0)
        assert config.transforms.interpolation == "bicubic" and config.transforms.train_scale == (0.05, 1.0)
    with pytest.raises(UnknownMethodError, match="unknown method 'aper_lora'.*aper_adapter.*aper_vpt_deep"):
        create_method("aper_lora", None)


@pytest.mark.parametrize("name", VARIANTS)
def test_only_pet_and_head_get_gradients_in_task_0(name, tiny_backbone_factory, synthetic_stream):
    method = create_method(name, tiny_backbone_factory())
    task = synthetic_stream.tasks[0]
    method.begin_task(task)
    method.train_head = type(method.head)(method.backbone.embed_dim, task.num_new)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    method.train().training_loss(x, y).backward()
    with_grad = {n.split(".")[0] for n, p in method.named_parameters() if p.grad is not None}
    assert with_grad == {"pet", "train_head"}
    assert {id(p) for p in method.trainable_parameters()} == {
        id(p) for p in [*method.pet.parameters(), *method.train_head.parameters()]
    }
    assert not any(p.requires_grad for p in method.backbone.parameters())


@pytest.fixture(scope="module")
def learned(synthetic_stream):
    """Each variant after tasks 0 and 1 (trained once per module), with what the tests compare against."""
    from strata.models.engine import Engine

    cache = {}

    def learn(name):
        if name not in cache:
            method = create_method(name, build_backbone("tiny"), overrides=FAST)
            engine = Engine("cpu", seed=0, show_progress=False)
            x = torch.rand(5, 3, 32, 32)
            losses = [method.learn(synthetic_stream.tasks[0], engine)]
            after_task_0 = {"logits": method(x), "pet": {k: v.clone() for k, v in method.pet.state_dict().items()}}
            losses.append(method.learn(synthetic_stream.tasks[1], engine))
            cache[name] = method, x, losses, after_task_0
        return cache[name]

    return learn


def test_task_0_adapts_then_later_tasks_only_add_prototypes(learned):
    method, _, losses, after_task_0 = learned("aper_adapter")
    assert len(losses[0]) == 1 and losses[1] == [] and method.train_head is None
    assert "train_head.weight" not in method.state_tensors()
    assert weights_fingerprint(method.backbone.vit) == method.backbone.info.fingerprint  # PTM untouched
    assert any(torch.any(a.up.weight) for a in method.pet.adapters)  # the adapter moved in task 0 ...
    assert all(torch.equal(after_task_0["pet"][k], v) for k, v in method.pet.state_dict().items())  # ... only


def test_prototypes_are_class_means_of_raw_merged_features(learned, synthetic_stream, engine):
    method, x, _, _ = learned("aper_ssf")
    merged = method.features(x)
    torch.testing.assert_close(merged[:, :128], method.backbone(x))  # PTM first, raw
    with attached(method.backbone, method.pet):
        torch.testing.assert_close(merged[:, 128:], method.backbone(x))
    task = synthetic_stream.tasks[1]
    features, labels = engine.extract(method.features, task.train.with_transform(method.test_transform()), 64)
    torch.testing.assert_close(method.head.weight.data[2:], class_means(features, labels, task.class_ids))
    assert method.head.weight.shape == (4, 256) and method.head.sigma.item() == 1.0


@pytest.mark.parametrize("name", ["aper_vpt_deep", "aper_finetune"])
def test_growing_leaves_old_logits_unchanged(name, learned):
    method, x, _, after_task_0 = learned(name)
    after = method(x)
    assert after.shape == (5, 4)
    torch.testing.assert_close(after[:, :2], after_task_0["logits"])


@pytest.mark.parametrize("name", VARIANTS)
def test_state_round_trip_gives_identical_logits(name, tmp_path, learned, synthetic_stream, engine):
    method, x, _, _ = learned(name)
    method.save_state(tmp_path)
    restored = create_method(name, build_backbone("tiny"), overrides=FAST)
    restored.load_state(tmp_path)
    torch.testing.assert_close(restored.eval()(x), method(x), rtol=0, atol=0)
    restored.learn(synthetic_stream.tasks[2], engine)
    assert restored(x).shape == (5, 6)


# -- bad input -----------------------------------------------------------------------------------
def test_state_of_another_variant_or_backbone_is_refused(tmp_path, tiny_backbone_factory, learned):
    method, _, _, _ = learned("aper_adapter")
    method.save_state(tmp_path)
    with pytest.raises(StateError, match="saved by method 'aper_adapter', not 'aper_ssf'"):
        create_method("aper_ssf", tiny_backbone_factory(), overrides=FAST).load_state(tmp_path)
    with pytest.raises(StateError, match="backbone tiny .*tiny-wide"):
        create_method("aper_adapter", tiny_backbone_factory("tiny-wide"), overrides=FAST).load_state(tmp_path)


def test_backbone_width_differing_from_config_fails_at_build(tiny_backbone_factory):
    with pytest.raises(BackboneError, match="configured for a 768-wide backbone.*is 128 wide"):
        create_method("aper_adapter", tiny_backbone_factory(), overrides={"embed_dim": 768})


# -- export --------------------------------------------------------------------------------------
def test_export_module_runs_in_onnxruntime(tmp_path, tiny_backbone_factory):
    ort = pytest.importorskip("onnxruntime")
    method = create_method("aper_adapter", tiny_backbone_factory())
    method.task_sizes.append(3)
    method.prepare_task(0, 3)
    _randomise(method.pet)
    _randomise(method.head, std=1.0)
    module = method.export_module()
    program = torch.onnx.export(
        module,
        (torch.rand(2, 3, 32, 32),),
        dynamo=True,
        dynamic_shapes=({0: "batch"},),
        opset_version=18,
        verbose=False,
    )
    program.save(str(tmp_path / "aper.onnx"))
    session = ort.InferenceSession(str(tmp_path / "aper.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 32, 32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
    assert not method.backbone.blocks[0].mlp._forward_hooks  # export left the backbone clean


def test_profiles_mirror_the_official_runs_and_reject_a_narrow_backbone(tiny_backbone_factory):
    from strata.tasks.benchmarking.profiles import profile_params

    params = profile_params("aper-adapter-imagenet-r")
    config = method_config(params["method"], params["overrides"])
    assert (params["base"], params["increment"], params["seed"]) == (0, 5, 1993)
    assert (config.train.optimizer.lr, config.train.optimizer.weight_decay, config.train.batch_size) == (0.05, 5e-3, 24)
    cifar = profile_params("aper-vpt-deep-cifar100")
    assert method_config(cifar["method"], cifar["overrides"]).train.epochs == 5
    with pytest.raises(BackboneError, match="768-wide"):
        create_method(cifar["method"], tiny_backbone_factory(), overrides=cifar["overrides"])
