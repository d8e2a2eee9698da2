"""True pixels, one decoder: every mode Pillow opens becomes 8-bit RGB by its real range, upright, the same at
ingest, in training and in the server, and a decoded-pixel budget refuses bombs before they are decoded."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from strata.cli.app import app
from strata.models import transforms
from strata.models.engine import Engine
from strata.models.images import BACKGROUND, IMAGE_FORMATS, MAX_PIXELS, ImageTooLargeError, decode, to_rgb
from strata.models.methods import create_method
from strata.models.streams import load_image
from strata.tasks.data.ingest import ingest
from strata.tasks.data.materialise import materialise
from strata.tasks.data.validate import BatchRejectedError, Limits, plan_batch
from strata.tasks.doctor.checks import diagnose
from strata.tasks.export.onnx_graph import export_method
from strata.tasks.serving.app import ServeConfig, create_app
from strata.tasks.serving.loaded_model import RequestError, decode_image
from strata.tasks.serving.sources import ExportDirSource
from strata.tasks.workspace.settings import load_settings
from strata.tasks.workspace.setup import init_workspace
from tests.test_hostile_inputs import png_claiming
from tests.test_serving import running

W, H = 64, 32
RAMP = np.tile(np.linspace(0, 1, W), (H, 1))  # 0..1 left to right: mean 0.5
GREY = (RAMP * 255).round().astype(np.uint8)
RGB = np.stack([GREY, 255 - GREY, np.full_like(GREY, 128)], -1)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def raw_tiff(values: np.ndarray, bits: int, sample_format: int) -> bytes:
    """An uncompressed one-strip greyscale TIFF with any integer sample type (Pillow cannot write uint32)."""
    height, width = values.shape
    dtype = {(32, 1): "<u4", (32, 2): "<i4", (16, 2): "<i2"}[(bits, sample_format)]
    data = values.astype(dtype).tobytes()
    short, long = 3, 4
    tags = [
        (256, short, width),
        (257, short, height),
        (258, short, bits),
        (259, short, 1),  # no compression
        (262, short, 1),  # black is zero
        (273, long, 8),  # the strip starts right after the header
        (277, short, 1),
        (278, short, height),
        (279, long, len(data)),
        (339, short, sample_format),
    ]
    entries = b"".join(
        struct.pack("<HHI", tag, kind, 1)
        + (struct.pack("<HH", value, 0) if kind == short else struct.pack("<I", value))
        for tag, kind, value in tags
    )
    ifd = struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8 + len(data)) + data + ifd


def _palette_half_transparent() -> bytes:
    image = Image.new("P", (W, H))
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste(1, (0, 0, W // 2, H))  # left half red (index 1), right half index 0: transparent
    return encoded(image, "PNG", transparency=0)


def _alpha_ramp(mode: str) -> Image.Image:
    """Black everywhere, opacity rising 0..255 left to right: on white it reads 255..0, mean 127.5."""
    image = Image.new({"LA": "L", "PA": "P", "RGBA": "RGB"}[mode], (W, H))
    image.putalpha(Image.fromarray(GREY))
    return image


SIXTEEN_BIT = (RAMP * 1000).round().astype(np.uint16)  # a dim 16-bit image: max 1000 of 65535
SIGNED = (RAMP * 65535 - 32768).round().astype(np.int64)
CASES = {  # what the file is: (its bytes, the mean of the RGB pixels the model must see, tolerance)
    "1-png": (encoded(Image.fromarray(GREY > 127).convert("1"), "PNG"), 127.5, 0.01),
    "L-png": (encoded(Image.fromarray(GREY), "PNG"), GREY.mean(), 0.01),
    "P-png": (encoded(Image.fromarray(RGB).quantize(64), "PNG"), RGB.mean(), 2),
    "P-png-transparent-index": (_palette_half_transparent(), (255 / 3 + 255) / 2, 0.01),  # red half, white half
    "PA-tiff": (encoded(_alpha_ramp("PA"), "TIFF"), 127.5, 0.6),
    "LA-png": (encoded(_alpha_ramp("LA"), "PNG"), 127.5, 0.6),
    "RGBA-png": (encoded(_alpha_ramp("RGBA"), "PNG"), 127.5, 0.6),
    "CMYK-jpeg": (encoded(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95), RGB.mean(), 1.5),
    "YCbCr-tiff": (encoded(Image.fromarray(RGB).convert("YCbCr"), "TIFF"), RGB.mean(), 2),
    "LAB-tiff": (encoded(Image.fromarray(RGB).convert("LAB"), "TIFF"), RGB.mean(), 2),
    "I;16-png-max-1000": (encoded(Image.fromarray(SIXTEEN_BIT), "PNG"), SIXTEEN_BIT.mean() / 257, 0.1),
    "I;16-tiff-max-1000": (encoded(Image.fromarray(SIXTEEN_BIT), "TIFF"), SIXTEEN_BIT.mean() / 257, 0.1),
    "I;16B-tiff-max-1000": (
        encoded(Image.frombytes("I;16B", (W, H), SIXTEEN_BIT.astype(">u2").tobytes()), "TIFF"),
        SIXTEEN_BIT.mean() / 257,
        0.1,
    ),
    "I;16-png-full-range": (encoded(Image.fromarray((RAMP * 65535).astype(np.uint16)), "PNG"), 127.5, 0.6),
    "I-tiff-int32": (encoded(Image.fromarray((RAMP * (2**31 - 1)).astype(np.int32)), "TIFF"), 127.5, 0.6),
    "I-tiff-uint32": (raw_tiff((RAMP * (2**32 - 1)).astype(np.uint64), 32, 1), 127.5, 0.6),
    "I-tiff-int16-signed": (  # negatives black, 0..32767 scaled to 0..255
        raw_tiff(SIGNED, 16, 2),
        np.round(np.clip(SIGNED / 32767, 0, 1) * 255).mean(),
        0.01,
    ),
    "F-tiff-0-to-1": (encoded(Image.fromarray(RAMP.astype(np.float32)), "TIFF"), 127.5, 0.6),
    "F-tiff-out-of-range-and-nan": (
        encoded(Image.fromarray(np.array([[-5.0, 0.5, 7.0, np.nan]], np.float32)), "TIFF"),
        (0 + 128 + 255 + 0) / 4,
        0.01,
    ),
    "GIF": (encoded(Image.fromarray(GREY), "GIF"), GREY.mean(), 0.01),
    "BMP": (encoded(Image.fromarray(RGB), "BMP"), RGB.mean(), 0.01),
    "WEBP-lossless": (encoded(Image.fromarray(RGB), "WEBP", lossless=True), RGB.mean(), 0.01),
}


@pytest.mark.parametrize("case", CASES)
def test_every_mode_becomes_rgb_by_its_real_range(case, tmp_path):
    data, mean, tolerance = CASES[case]
    image = decode(data)
    assert image.mode == "RGB" and image.size == Image.open(io.BytesIO(data)).size
    assert np.asarray(image).mean() == pytest.approx(mean, abs=tolerance)
    path = tmp_path / "image"
    path.write_bytes(data)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(image))  # the training reader: the same pixels


def test_a_dim_16_bit_image_is_not_white():
    """Before: Pillow's ``convert`` clipped every value above 255, so this image trained as almost all white."""
    data = CASES["I;16-png-max-1000"][0]
    pixels = np.asarray(decode(data))
    assert pixels.max() == round(1000 / 257) and pixels.mean() < 2
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).mean() > 220  # the old decode


def test_in_memory_modes_without_a_file_format():
    hsv = Image.fromarray(RGB).convert("HSV")
    assert np.abs(np.asarray(to_rgb(hsv), float) - RGB).max() <= 5  # HSV's 8-bit hue steps
    premultiplied = _alpha_ramp("RGBA").convert("RGBa")
    assert np.asarray(to_rgb(premultiplied)).mean() == pytest.approx(127.5, abs=0.6)
    assert to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == BACKGROUND


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_ordinary_8_bit_rgb_decodes_byte_identically_to_the_old_path(fmt):
    """The methods are verified against official code on 8-bit RGB: those pixels and tensors must not move."""
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)), fmt)
    old = Image.open(io.BytesIO(data)).convert("RGB")
    new = decode(data)
    assert new.tobytes() == old.tobytes() and new.size == old.size
    transform = transforms.test_transform(transforms.TransformConfig(), 32)
    assert torch.equal(transform(new), transform(old))


def test_exif_orientation_is_applied():
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[:8, :8] = 255  # a white block at the top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write portrait photos
    upright = np.asarray(decode(encoded(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)))
    assert upright.shape == (W, H, 3)
    assert upright[:8, -8:].mean() > 240 and upright[:8, :8].mean() < 15  # now at the top-right


def test_the_pixel_budget_refuses_from_the_header_before_decoding():
    with pytest.raises(ImageTooLargeError, match=r"9000x9000 pixels is over the size limit"):
        decode(png_claiming(9000, 9000))  # a ~100-byte file: decoding it would take 81 M pixels
    with pytest.raises(ImageTooLargeError, match="DecompressionBombError"):
        decode(png_claiming(100_000, 100_000))  # past Pillow's own guard too
    with pytest.raises(ImageTooLargeError, match="the limit is 100 pixels"):
        decode(encoded(Image.new("RGB", (11, 10)), "PNG"), max_pixels=100)


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_stream, tiny_backbone_factory):
    """A tiny SimpleCIL after one task, exported (float graph: the method's test transform in the server)."""
    root = tmp_path_factory.mktemp("pixels-export")
    method = create_method("simplecil", tiny_backbone_factory(), overrides={"train": {"epochs": 1, "batch_size": 8}})
    method.learn(synthetic_stream.tasks[0], Engine("cpu", seed=0, show_progress=False))
    export_method(method.eval(), root)
    return root, method


def test_ingest_training_and_the_server_decode_alike(served, tmp_path):
    """A batch of 16-bit PNGs: ingest accepts it, training reads the same pixels as ``decode``, and the server
    answers an upload of the 16-bit file exactly as an 8-bit PNG of those pixels (and as PyTorch on them)."""
    root, method = served
    init_workspace(tmp_path / "ws")
    settings = load_settings(tmp_path / "ws")
    source = tmp_path / "batch"
    rng = np.random.default_rng(0)
    for name in ("dim", "dimmer"):
        (source / name).mkdir(parents=True)
        for i in range(2):
            values = rng.integers(0, 3000 if name == "dim" else 1000, (24, 24), dtype=np.uint16)
            Image.fromarray(values).save(source / name / f"{i}.png")
    version = ingest(settings, source, "greys")
    dataset = materialise(settings, version.batch_id)
    file = Path(dataset.train.images[0])
    pixels = np.asarray(dataset.train[0][0])
    assert np.array_equal(pixels, np.asarray(decode(file.read_bytes()))) and pixels.max() < 3000 / 257 + 1

    uploads = [
        ("files", ("sixteen.png", file.read_bytes(), "image/png")),
        ("files", ("eight.png", encoded(Image.fromarray(pixels), "PNG"), "image/png")),
    ]
    with running(create_app(ExportDirSource(root))) as url, httpx.Client(base_url=url, timeout=30) as client:
        answer = client.post("/predict", files=uploads, params={"k": 4})
    assert answer.status_code == 200, answer.text
    sixteen, eight = ({p["class"]: p["probability"] for p in row} for row in answer.json()["predictions"])
    assert sixteen == eight
    with torch.inference_mode():
        expected = method(method.test_transform()(Image.fromarray(pixels))[None]).softmax(1)[0]
    assert sixteen == pytest.approx({c: float(p) for c, p in zip(method.class_names, expected, strict=True)}, abs=1e-4)
    assert diagnose(settings) == []


def test_the_server_refuses_over_budget_images_and_requests_with_413(served):
    config = ServeConfig(max_pixels=2_500, max_request_pixels=4_000)
    small = encoded(Image.new("RGB", (40, 40)), "PNG")  # 1,600 pixels
    with running(create_app(ExportDirSource(served[0]), config)) as url, httpx.Client(base_url=url) as client:
        big = client.post("/predict", files={"files": ("big.png", encoded(Image.new("RGB", (60, 50)), "PNG"))})
        bomb = client.post("/predict", files={"files": ("bomb.png", png_claiming(100_000, 100_000))})
        many = client.post("/predict", files=[("files", (f"{i}.png", small, "image/png")) for i in range(3)])
        one = client.post("/predict", files={"files": ("one.png", small, "image/png")})
    assert big.status_code == 413 and big.json() == {
        "detail": "'big.png': 60x50 pixels is over the size limit (possible decompression bomb): "
        "the limit is 2500 pixels"
    }
    assert bomb.status_code == 413 and "'bomb.png': does not decode" in bomb.json()["detail"]
    assert many.status_code == 413 and many.json() == {
        "detail": "the 3 images hold 4800 pixels together; the limit is 4000 per request: send fewer or smaller images"
    }
    assert one.status_code == 200, one.text


def test_ingest_names_the_file_over_the_budget_and_writes_nothing(tmp_path):
    init_workspace(tmp_path / "ws")
    settings = load_settings(tmp_path / "ws")
    source = tmp_path / "batch"
    for c, name in enumerate(("cat", "dog")):
        (source / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10 + i, 10), (c, i, 0)).save(source / name / f"{i}.png")
    (source / "cat" / "bomb.png").write_bytes(png_claiming(9000, 9000))
    result = CliRunner().invoke(
        app, ["ingest", str(source), "--learner", "pets", "--workspace", str(settings.workspace)]
    )
    assert result.exit_code == 2, result.output
    assert "cat/bomb.png: 9000x9000 pixels is over the size limit" in " ".join(result.output.split())

    (source / "cat" / "bomb.png").unlink()
    with pytest.raises(BatchRejectedError, match=r"the batch's images hold 420 pixels \(limit 400 per batch\)"):
        ingest(settings, source, "pets", limits=Limits(max_batch_pixels=400))
    assert not (settings.workspace / "data").exists()
    assert diagnose(settings) == []


def test_ingest_and_the_server_accept_exactly_one_list_of_formats(tmp_path):
    """Every format of ``IMAGE_FORMATS`` passes ingest validation and the server's decode; PPM passes neither."""

    def image(fmt: str, i: int) -> bytes:
        picture = Image.fromarray(RGB // (i + 1))
        options = {"save_all": True, "append_images": [picture]} if fmt == "MPO" else {}  # two pictures: MPO
        return encoded(picture, fmt, **options)

    for fmt in IMAGE_FORMATS:
        (tmp_path / "ok" / fmt).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "ok" / fmt / f"{i}.{'jpg' if fmt == 'MPO' else fmt.lower()}").write_bytes(image(fmt, i))
        assert Image.open(io.BytesIO(image(fmt, 0))).format == fmt
        assert decode_image(f"a.{fmt}", image(fmt, 0), MAX_PIXELS).size == (W, H)
    assert sorted(plan_batch(tmp_path / "ok").classes) == sorted(IMAGE_FORMATS)

    (tmp_path / "ppm" / "cat").mkdir(parents=True)
    for i in range(2):
        (tmp_path / "ppm" / "cat" / f"{i}.png").write_bytes(image("PPM", i))
    with pytest.raises(BatchRejectedError, match=r"cat/0.png: format PPM is not accepted \(accepted: JPEG, MPO, PNG"):
        plan_batch(tmp_path / "ppm")
    with pytest.raises(RequestError, match="'a.ppm': format PPM is not accepted") as refused:
        decode_image("a.ppm", image("PPM", 0), MAX_PIXELS)
    assert refused.value.status == 415
