"""SimpleCIL and finetune mechanisms, the registry, and state save/load."""

import pytest
import torch

from strata.models.heads import class_means
from strata.models.methods import StateError, UnknownMethodError, available_methods, create_method, method_config


def test_registry_lists_valid_names_on_unknown():
    assert {"simplecil", "finetune"} <= set(available_methods())
    with pytest.raises(UnknownMethodError, match="unknown method 'lwf'.*finetune.*simplecil"):
        create_method("lwf", None)


def test_config_overrides_are_validated():
    assert method_config("finetune", {"train": {"epochs": 2}}).train.epochs == 2
    assert method_config("finetune").train.optimizer.lr == 0.01
    with pytest.raises(Exception, match="not_a_field"):
        method_config("finetune", {"not_a_field": 1})


def test_simplecil_prototypes_are_class_means_of_raw_features(tiny_backbone_factory, synthetic_stream, engine):
    method = create_method("simplecil", tiny_backbone_factory())
    task = synthetic_stream.tasks[0]
    method.learn(task, engine)
    features, labels = engine.extract(method.backbone, task.train.with_transform(method.test_transform()), 64)
    expected = class_means(features, labels, task.class_ids)
    torch.testing.assert_close(method.head.weight.data, expected)
    assert method.head.sigma.item() == 1.0
    assert not any(p.requires_grad for p in method.backbone.parameters())


def test_simplecil_growth_leaves_old_logits_unchanged(tiny_backbone_factory, synthetic_stream, engine):
    method = create_method("simplecil", tiny_backbone_factory())
    x = torch.rand(5, 3, 32, 32)
    method.learn(synthetic_stream.tasks[0], engine)
    before = method(x)
    method.learn(synthetic_stream.tasks[1], engine)
    after = method(x)
    assert after.shape == (5, 4)
    torch.testing.assert_close(after[:, :2], before)


def test_simplecil_extracts_each_training_image_once(tiny_backbone_factory, synthetic_stream, engine):
    method = create_method("simplecil", tiny_backbone_factory())
    seen = []
    method.backbone.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    method.learn(synthetic_stream.tasks[0], engine)
    assert sum(seen) == len(synthetic_stream.tasks[0].train)


@pytest.mark.parametrize("name", ["simplecil", "finetune", "finetune_head"])
def test_state_round_trip_gives_identical_logits(name, tmp_path, tiny_backbone_factory, synthetic_stream, engine):
    method = create_method(name, tiny_backbone_factory(), overrides={"train": {"epochs": 1, "batch_size": 8}})
    for task in synthetic_stream.tasks[:2]:
        method.learn(task, engine)
    method.save_state(tmp_path)
    x = torch.rand(4, 3, 32, 32)
    expected = method.eval()(x)

    restored = create_method(name, tiny_backbone_factory(), overrides={"train": {"epochs": 1, "batch_size": 8}})
    restored.load_state(tmp_path)
    assert restored.class_names == method.class_names and restored.task_sizes == [2, 2]
    torch.testing.assert_close(restored.eval()(x), expected, rtol=0, atol=0)
    # continuing after a restore works like continuing the original
    restored.learn(synthetic_stream.tasks[2], engine)
    assert restored(x).shape == (4, 6)


def test_state_excludes_frozen_backbone_but_not_finetuned_one(tiny_backbone_factory):
    frozen = create_method("simplecil", tiny_backbone_factory()).state_tensors()
    trained = create_method("finetune", tiny_backbone_factory()).state_tensors()
    assert not any(k.startswith("backbone.") for k in frozen)
    assert any(k.startswith("backbone.") for k in trained)


def test_loading_foreign_state_fails_loudly(tmp_path, tiny_backbone_factory, synthetic_stream, engine):
    method = create_method("simplecil", tiny_backbone_factory())
    method.learn(synthetic_stream.tasks[0], engine)
    method.save_state(tmp_path)
    with pytest.raises(StateError, match="saved by method 'simplecil', not 'finetune'"):
        create_method("finetune", tiny_backbone_factory()).load_state(tmp_path)
    with pytest.raises(StateError, match="backbone tiny .*tiny-wide"):
        create_method("simplecil", tiny_backbone_factory("tiny-wide")).load_state(tmp_path)
    with pytest.raises(StateError, match="another simplecil configuration"):
        create_method("simplecil", tiny_backbone_factory(), overrides={"eval_batch_size": 7}).load_state(tmp_path)
    with pytest.raises(StateError, match="holds no Strata method state"):
        create_method("simplecil", tiny_backbone_factory()).load_state(tmp_path / "nowhere")


def test_finetune_head_mode_trains_only_the_head(tiny_backbone_factory, synthetic_stream, engine):
    method = create_method("finetune_head", tiny_backbone_factory(), overrides={"train": {"epochs": 1}})
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    method.learn(synthetic_stream.tasks[0], engine)
    assert all(torch.equal(before[k], v) for k, v in method.backbone.state_dict().items())
    assert {n for n, p in method.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_finetune_full_mode_changes_the_backbone(tiny_backbone_factory, synthetic_stream, engine):
    method = create_method("finetune", tiny_backbone_factory(), overrides={"train": {"epochs": 1}})
    before = method.backbone.vit.blocks[0].attn.qkv.weight.clone()
    method.learn(synthetic_stream.tasks[0], engine)
    assert not torch.equal(before, method.backbone.vit.blocks[0].attn.qkv.weight)


def test_tasks_must_come_in_order(tiny_backbone_factory, synthetic_stream, engine):
    method = create_method("simplecil", tiny_backbone_factory())
    with pytest.raises(ValueError, match="expected task 0 next, got task 1"):
        method.learn(synthetic_stream.tasks[1], engine)
