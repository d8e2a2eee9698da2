"""OVOR / OnePrompt: prompt placement, masked CE, VOR loss and outliers, schedule, phases, state, export."""

import math

import pytest
import torch
import torch.nn.functional as F

from strata.models.backbones import build_backbone
from strata.models.engine import Engine, schedule_factor
from strata.models.evaluation import evaluate
from strata.models.methods import create_method, method_config
from strata.models.methods.ovor import OUTLIER_LABEL, mask_old_classes
from strata.models.ood import OutlierConfig, VORLossConfig, kth_neighbour_distance, synthesize_outliers, vor_loss
from strata.models.pet.attach import attach_pets
from strata.models.pet.oneprompt import OnePrompt
from strata.models.pet.prefix import PrefixAttention

SMALL = {"train": {"epochs": 2, "batch_size": 8}, "vor_epochs": 1, "outliers": {"num_per_class": 4}}


@pytest.fixture(scope="module")
def vit_b16():
    return build_backbone("vit_base_patch16_224.augreg_in21k", pretrained=False)


def test_prompt_prepends_5_then_20_key_and_value_tokens_at_layers_0_to_4_only(vit_b16, monkeypatch):
    prompt = OnePrompt(vit_b16)
    attachment = attach_pets(vit_b16, prompt)
    lengths = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        lengths.append((k.shape[2], v.shape[2]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    try:
        with torch.no_grad():
            vit_b16(torch.rand(1, 3, 224, 224))
    finally:
        attachment.detach()
    assert lengths == [(202, 202)] * 2 + [(217, 217)] * 3 + [(197, 197)] * 7  # 197 tokens + 5 / 20 prompts
    assert sum(p.numel() for p in prompt.parameters()) == 107_520


def test_prompt_tokens_are_uniform_0_1_and_prepended_before_cls(tiny_backbone_factory):
    backbone = tiny_backbone_factory("tiny-wide")
    prompt = OnePrompt(backbone)
    attach_pets(backbone, prompt)
    assert sorted(prompt.layers) == ["0", "1", "2", "3", "4"]
    tokens = torch.cat([p.tokens.flatten() for p in prompt.layers.values()])
    assert 0 <= tokens.min() and tokens.max() <= 1 and abs(tokens.mean().item() - 0.5) < 0.02
    attn = backbone.blocks[3].attn
    assert isinstance(attn, PrefixAttention) and attn.position == "front" and not attn.compensate
    keys, values = prompt.layers["3"](2)
    assert keys.shape == values.shape == (2, 20, 192)


def test_vor_loss_on_hand_computed_logits():
    id_logits = torch.tensor([[10 - math.log(2), 10 - math.log(2)]])  # logsumexp 10 → E −10 → Huber(5) = 4.5
    ood_logits = torch.tensor([[5.0, float("-inf")]])  # logsumexp 5 → E −5 → Huber(2) = 1.5
    torch.testing.assert_close(vor_loss(id_logits, ood_logits, VORLossConfig()), torch.tensor(0.6))
    inside = vor_loss(torch.tensor([[20.0]]), torch.tensor([[1.0]]), VORLossConfig())
    assert inside.item() == 0.0  # ID energy below −15 and outlier energy above −3 cost nothing


def test_masked_cross_entropy_ignores_old_classes():
    logits = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([2, 3, 4, 2])
    loss = F.cross_entropy(mask_old_classes(logits, 2), labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, 2:], labels - 2))
    loss.backward()
    assert (logits.grad[:, :2] == 0).all() and (logits.grad[:, 2:] != 0).any()


def test_schedule_is_coda_cosine_with_the_released_off_by_one_over_20_epochs(tiny_backbone_factory, synthetic_stream):
    config = method_config("ovor")
    assert (config.train.epochs, config.vor_epochs, config.train.batch_size) == (20, 4, 128)
    optimizer = config.train.optimizer
    assert (optimizer.name, optimizer.lr, optimizer.betas, optimizer.weight_decay) == ("adam", 1e-3, (0.9, 0.999), 0)
    assert (method_config("oneprompt").train.epochs, method_config("oneprompt").vor_epochs) == (50, 0)
    reports = []
    engine = Engine("cpu", show_progress=False, on_epoch_end=reports.append)
    method = create_method("ovor", tiny_backbone_factory(), overrides={"outliers": {"num_per_class": 4}})
    method.learn(synthetic_stream.tasks[0], engine)
    multipliers = [round(r.lr / 1e-3, 3) for r in reports]
    assert multipliers[:4] == [1.0, 1.0, 0.997, 0.987] and multipliers[-4:] == [0.336, 0.258, 0.178, 0.097]
    assert multipliers == [round(schedule_factor("coda_cosine", e, 20, 1e-3, 0), 3) for e in range(20)]


def _brute_force_kth(queries, bank, k):
    return ((queries[:, None] - bank[None]) ** 2).sum(-1).sort(dim=1).values[:, k - 1]


@pytest.mark.parametrize("mode", ["released", "paper"])
def test_outliers_are_deterministic_and_the_highest_distance_candidates(mode):
    config = OutlierConfig(mode=mode, k=5, select=4, sample_from=30, num_per_class=3, chunk=7)
    features = torch.randn(60, 16) * 3 + 1
    first = synthesize_outliers(features, 2, config, torch.Generator().manual_seed(7))
    again = synthesize_outliers(features, 2, config, torch.Generator().manual_seed(7))
    other = synthesize_outliers(features, 2, config, torch.Generator().manual_seed(8))
    assert first.shape == (6, 16) and torch.equal(first, again) and not torch.equal(first, other)

    bank = F.normalize(features, dim=1)
    noise = 0.1 * torch.randn(30, 16, generator=torch.Generator().manual_seed(7))
    boundary = bank[_brute_force_kth(bank, bank, 5).argsort(descending=True)[:4]]
    offsets = torch.zeros_like(boundary) if mode == "released" else boundary
    candidates = (offsets[:, None] + noise[None]).flatten(0, 1)  # noise tiled once per boundary sample
    scores = _brute_force_kth(candidates, bank, 5)
    expected = candidates[scores.argsort(descending=True)[:6]]
    torch.testing.assert_close(_brute_force_kth(first, bank, 5), _brute_force_kth(expected, bank, 5))
    assert torch.cdist(first, expected).min(dim=1).values.max() < 1e-5  # the same vectors
    if mode == "released":  # around the origin, unnormalised: the boundary points are unused
        assert first.norm(dim=1).max() < 0.1 * 16**0.5 * 3


def test_kth_neighbour_distance_matches_brute_force_and_clips_k():
    queries, bank = torch.randn(11, 8), torch.randn(9, 8)
    torch.testing.assert_close(kth_neighbour_distance(queries, bank, 3, chunk=4), _brute_force_kth(queries, bank, 3))
    torch.testing.assert_close(kth_neighbour_distance(queries, bank, 50), _brute_force_kth(queries, bank, 9))


def test_vor_epochs_change_only_the_head_on_features_extracted_once(tiny_backbone_factory, synthetic_stream, engine):
    overrides = {"train": {"epochs": 2, "batch_size": 8}, "vor_epochs": 2, "outliers": {"num_per_class": 4}}
    method = create_method("ovor", tiny_backbone_factory(), overrides=overrides)
    task = synthetic_stream.tasks[0]
    method.begin_task(task)
    prompt = {k: v.clone() for k, v in method.prompt.state_dict().items()}
    head = {k: v.clone() for k, v in method.head.state_dict().items()}
    backbone = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    images = []
    method.backbone.vit.patch_embed.register_forward_hook(lambda _m, args, _o: images.append(len(args[0])))
    method.fit_task(task, engine)
    assert sum(images) == 2 * len(task.train)  # one extraction per VOR epoch, no image batches
    for name, value in method.prompt.state_dict().items():
        assert torch.equal(value, prompt[name])
    for name, value in method.backbone.state_dict().items():
        assert torch.equal(value, backbone[name])
    assert all(not torch.equal(value, head[name]) for name, value in method.head.state_dict().items())


def test_vor_batches_zip_shuffled_features_with_outlier_batches(tiny_backbone_factory, synthetic_stream, engine):
    method = create_method("ovor", tiny_backbone_factory(), overrides=SMALL)
    task = synthetic_stream.tasks[0]
    method.begin_task(task)
    method._fitting = (task, engine)
    batches = method.vor_batches(0)
    n_id, n_ood = len(task.train), 4 * task.num_new  # 18 ID features, 8 outliers
    assert len(batches) == math.ceil(n_id / 8)
    ood_counts = [(labels == OUTLIER_LABEL).sum().item() for _, labels in batches]
    assert ood_counts == [n_ood // len(batches)] * len(batches)
    assert sum(len(labels) for _, labels in batches) - sum(ood_counts) == n_id


def test_one_backbone_forward_per_image_at_inference(tiny_backbone_factory, synthetic_stream, engine):
    method = create_method("ovor", tiny_backbone_factory(), overrides=SMALL)
    for task in synthetic_stream.tasks[:2]:
        method.learn(task, engine)
    images = []
    method.backbone.vit.patch_embed.register_forward_hook(lambda _m, args, _o: images.append(len(args[0])))
    evaluate(method, synthetic_stream.tasks[:2], engine)
    assert sum(images) == sum(len(t.test) for t in synthetic_stream.tasks[:2])


def test_state_round_trip_and_onnx_export(tmp_path, tiny_backbone_factory, synthetic_stream, engine):
    import onnxruntime as ort

    method = create_method("ovor", tiny_backbone_factory(), overrides=SMALL)
    for task in synthetic_stream.tasks[:2]:
        method.learn(task, engine)
    method.save_state(tmp_path / "state")
    x = torch.rand(3, 3, 32, 32)
    expected = method.eval()(x).detach()
    restored = create_method("ovor", tiny_backbone_factory(), overrides=SMALL)
    restored.load_state(tmp_path / "state")
    torch.testing.assert_close(restored.eval()(x), expected, rtol=0, atol=0)

    path = tmp_path / "ovor.onnx"
    torch.onnx.export(
        method.export_module(), (x,), str(path), dynamo=True, dynamic_shapes=({0: "batch"},), opset_version=18
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


def test_config_rejects_more_vor_epochs_than_epochs_and_sets_ovor_transforms():
    with pytest.raises(ValueError, match="vor_epochs"):
        method_config("ovor", {"train": {"epochs": 3}})
    transforms = method_config("ovor").transforms
    assert (transforms.interpolation, transforms.train_scale) == ("bilinear", (0.08, 1.0))
