"""ONNX export of every registered method: checker, parity gate, fp16, in-graph preprocessing, Triton."""

import json

import numpy as np
import onnx
import pytest
import torch

from strata.models.methods import available_methods, create_method, method_entry
from strata.tasks.export.onnx_graph import ExportError, check_parity, export_method
from strata.tasks.export.triton import write_triton_repository
from strata.tasks.serving.providers import create_session, preferred_providers


def _fast(name: str) -> dict:
    """One short epoch per task; OVOR's VOR epochs count inside train.epochs, so keep one of two."""
    overrides = {"train": {"epochs": 1, "batch_size": 8}}
    if "vor_epochs" in method_entry(name).method_class.config_class.model_fields:
        overrides = {"train": {"epochs": 2, "batch_size": 8}, "vor_epochs": 1}
    return overrides


def _learned(name, backbone, stream, engine, tasks=2):
    method = create_method(name, backbone, overrides=_fast(name))
    for task in stream.tasks[:tasks]:
        method.learn(task, engine)
    return method.eval()


@pytest.mark.parametrize("name", available_methods())
def test_every_method_exports_with_parity(name, tmp_path, tiny_backbone_factory, synthetic_stream, engine):
    method = _learned(name, tiny_backbone_factory(), synthetic_stream, engine)
    result = export_method(method, tmp_path)
    onnx.checker.check_model(str(result.model_path))
    assert result.parity.max_abs_diff <= 1e-4 and result.parity.argmax_agreement == 1.0
    assert result.parity.provider == "CPUExecutionProvider"
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert labels == {str(i): n for i, n in enumerate(method.class_names)}
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["method"] == name and meta["output"]["classes"] == 4 and meta["opset"] == 18
    # dynamic batch axis: a batch size never seen at export time
    session = create_session(result.model_path)
    x = torch.rand(3, 3, 32, 32)
    got = session.run(None, {"pixels": x.numpy()})[0]
    with torch.inference_mode():
        np.testing.assert_allclose(got, method.export_module()(x).numpy(), atol=1e-4)


def test_fp16_export_within_its_bound(tmp_path, tiny_backbone_factory, synthetic_stream, engine):
    method = _learned("simplecil", tiny_backbone_factory(), synthetic_stream, engine)
    result = export_method(method, tmp_path, fp16=True)
    assert result.meta["precision"] == "fp16"
    assert result.parity.max_abs_diff <= 5e-2 and result.parity.argmax_agreement >= 0.995
    model = onnx.load(str(result.model_path))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O kept


def test_preprocessing_inside_the_graph(tmp_path, tiny_backbone_factory, synthetic_stream, engine):
    method = _learned("simplecil", tiny_backbone_factory(), synthetic_stream, engine)
    result = export_method(method, tmp_path, preprocess_hw=(48, 40))
    session = create_session(result.model_path)
    assert session.get_inputs()[0].type == "tensor(uint8)"
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    logits = session.run(None, {"pixels": images})[0]
    # close to the PIL test transform the method uses in PyTorch (resize implementations differ slightly)
    from PIL import Image

    transform = method.test_transform()
    reference = torch.stack([transform(Image.fromarray(img)) for img in images])
    with torch.inference_mode():
        expected = method(reference).numpy()
    assert (logits.argmax(1) == expected.argmax(1)).all()
    assert np.abs(logits - expected).max() < 0.05


def test_parity_gate_rejects_a_different_graph(tmp_path, tiny_backbone_factory, synthetic_stream, engine):
    method = _learned("simplecil", tiny_backbone_factory(), synthetic_stream, engine)
    result = export_method(method, tmp_path)
    with torch.no_grad():
        method.head.weight.mul_(-1)  # PyTorch now disagrees with the exported graph
    with pytest.raises(ExportError, match="parity gate failed"):
        check_parity(method.export_module(), result.model_path, torch.rand(8, 3, 32, 32))


def test_cpu_machine_never_asks_for_cuda():
    if torch.cuda.is_available():
        pytest.skip("this check is for machines without a GPU")
    assert preferred_providers(tensorrt=True) == ["CPUExecutionProvider"]


def test_triton_repository_config(tmp_path, tiny_backbone_factory, synthetic_stream, engine):
    method = _learned("simplecil", tiny_backbone_factory(), synthetic_stream, engine)
    result = export_method(method, tmp_path / "export")
    folder = write_triton_repository(
        result.model_path, tmp_path / "triton", "strata-digits", version=3, max_batch_size=16, tensorrt=True
    )
    assert (folder / "3" / "model.onnx").read_bytes() == result.model_path.read_bytes()
    config = (folder / "config.pbtxt").read_text()
    assert 'name: "strata-digits"' in config and 'platform: "onnxruntime_onnx"' in config
    assert "max_batch_size: 16" in config
    assert '{ name: "pixels", data_type: TYPE_FP32, dims: [ 3, 32, 32 ] }' in config
    assert '{ name: "logits", data_type: TYPE_FP32, dims: [ 4 ] }' in config
    assert "preferred_batch_size: [ 4, 8, 16 ]" in config and "max_queue_delay_microseconds" in config
    assert 'name : "tensorrt"' in config and "KIND_GPU" in config
    with pytest.raises(ValueError, match="must match"):
        write_triton_repository(result.model_path, tmp_path / "triton", "../escape")
