"""Frozen timm ViT backbones: build by name, load weights, expose the CLS feature.

All three reference codes feed the ViT raw ``ToTensor()`` pixels in [0, 1] (no mean/std
normalisation) and use the CLS token after the final LayerNorm as the feature; this module
does the same so that numbers match theirs for the same checkpoint.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file as load_safetensors
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from strata.models.errors import UserError

DEFAULT_BACKBONE = "vit_base_patch16_224.augreg_in21k"

# Small randomly initialised ViTs for tests and demos, registered by name like timm's models.
# They are always labelled random-init; their weights come from a fixed seed so that a state saved
# in one process loads against identical backbone weights in another.
TINY_BACKBONES: dict[str, dict] = {
    "tiny": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0),
    "tiny-wide": dict(img_size=32, patch_size=4, embed_dim=192, depth=5, num_heads=3, mlp_ratio=2.0),
}
TINY_SEED = 0
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
SAVE_WEIGHTS_HINT = (
    "Save the model's plain state dict, e.g. safetensors.torch.save_file(model.state_dict(), "
    "'vit.safetensors'), and pass that file with --weights."
)


class BackboneError(UserError, ValueError):
    """A backbone cannot be built as asked; the message says how to fix it."""


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a backbone's weights, recorded with every saved state."""

    name: str
    source: str  # "random-init", "timm-pretrained" or "file:<path>"
    embed_dim: int
    depth: int
    image_size: int
    fingerprint: str = field(default="")

    @property
    def random_init(self) -> bool:
        return self.source == "random-init"

    @property
    def label(self) -> str:
        tag = "RANDOM-INIT, not pretrained" if self.random_init else self.source
        return f"{self.name} ({tag})"


class Backbone(nn.Module):
    """A frozen ViT with timm's ``forward_features``/``forward_head`` split.

    ``forward_features`` returns all tokens after the final norm; ``forward_head`` picks the CLS
    token. The same forward in pieces — ``embed``, ``run_blocks`` over any range of blocks,
    ``final_feature`` — lets a method run shared early blocks once (LAE's two experts) without
    reaching into timm's private methods. PET modules attach to ``self.vit`` by wrapping or
    hooking, never by copying.
    """

    def __init__(self, vit: VisionTransformer, info: BackboneInfo):
        super().__init__()
        self.vit = vit
        self.info = info
        self.requires_grad_(False)
        self.eval()

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    @property
    def image_size(self) -> int:
        return self.info.image_size

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tokens entering block 0: patch embedding, CLS token and position embedding (timm's
        ``_pos_embed``), then patch dropout and the pre-norm, exactly as ``forward_features`` starts."""
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))

    def run_blocks(self, tokens: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks ``start`` to ``stop`` (exclusive; None runs to the last) applied to ``tokens``."""
        return self.vit.blocks[start:stop](tokens)

    def final_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        """The feature of the last block's output tokens: the CLS token after the final LayerNorm."""
        return self.forward_head(self.vit.norm(tokens))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the module's tensors in key order: identifies the exact weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def build_backbone(
    name: str = DEFAULT_BACKBONE, weights: str | Path | None = None, pretrained: bool = True
) -> Backbone:
    """Build a frozen ViT backbone.

    ``name`` is ``tiny``/``tiny-wide`` (random-init, for tests and demos) or any timm ViT name.
    Weights: ``weights`` (a local .safetensors/.pth/.npz file) wins; otherwise timm's pretrained
    loading (its hub cache). Without either, building fails with a message naming both options:
    there is never a silent fallback to random weights for a named pretrained model.
    """
    if name in TINY_BACKBONES:
        vit = _create_tiny(name)
        source = "random-init"
        if weights is not None:
            _load_weights_file(vit, Path(weights), name)
            source = f"file:{weights}"
    else:
        if not timm.is_model(name.split(".")[0]):
            raise BackboneError(_unknown_backbone_message(name))
        created = timm.create_model(name, pretrained=False, num_classes=0)
        if not isinstance(created, VisionTransformer):
            raise BackboneError(f"backbone {name!r} is not a VisionTransformer; Strata adapts timm ViTs only")
        vit = created
        if weights is not None:
            _load_weights_file(vit, Path(weights), name)
            source = f"file:{weights}"
        elif pretrained:
            _load_pretrained(vit, name)
            source = "timm-pretrained"
        else:
            source = "random-init"
    info = BackboneInfo(
        name=name,
        source=source,
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        image_size=vit.patch_embed.img_size[0],
        fingerprint=weights_fingerprint(vit),
    )
    return Backbone(vit, info)


def _create_tiny(name: str) -> VisionTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return VisionTransformer(num_classes=0, global_pool="token", **TINY_BACKBONES[name])


def _unknown_backbone_message(name: str) -> str:
    close = timm.list_models(f"*{name.split('.')[0][-12:]}*")[:5]
    hint = f" Close timm names: {', '.join(close)}." if close else ""
    return (
        f"unknown backbone {name!r}. Use one of {', '.join(sorted(TINY_BACKBONES))} (random-init, for tests) "
        f"or a timm ViT name such as {DEFAULT_BACKBONE} (see timm.list_models('vit_*')).{hint}"
    )


def _load_pretrained(vit: VisionTransformer, name: str) -> None:
    try:
        loaded = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # network errors, missing hub cache, gated repos: all end the same way
        raise BackboneError(
            f"pretrained weights for {name!r} are not available here ({type(exc).__name__}: {exc}). "
            f"Either pass a local weights file with --weights PATH (.safetensors, .pth or .npz), "
            f"or put the checkpoint in the Hugging Face hub cache (HF_HOME) on a connected machine "
            f"so timm's pretrained loading finds it."
        ) from exc
    vit.load_state_dict(loaded.state_dict())


def _load_weights_file(vit: VisionTransformer, path: Path, name: str) -> None:
    """Load a local checkpoint safely (no pickle) and refuse one of another architecture."""
    if not path.is_file():
        raise BackboneError(
            f"weights file {path} does not exist. Download the checkpoint for {name!r} on a connected "
            f"machine (e.g. timm.create_model({name!r}, pretrained=True) then save_file(model.state_dict(), "
            f"'vit.safetensors')) and pass its path with --weights."
        )
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"weights file {path} has suffix {suffix!r}; expected one of {WEIGHT_SUFFIXES}")
    state: object  # whatever the file holds; checked below to be a flat tensor state dict
    try:
        if suffix == ".npz":
            vit.load_pretrained(str(path))  # timm's reader of the original JAX checkpoints
            return
        if suffix == ".safetensors":
            state = load_safetensors(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text would advise weights_only=False: the unsafe way
        raise BackboneError(
            f"cannot read weights file {path}: it holds pickled Python objects besides tensors, "
            f"which Strata never unpickles (that can run code). {SAVE_WEIGHTS_HINT}"
        ) from exc
    except Exception as exc:
        raise BackboneError(
            f"cannot read weights file {path}: {type(exc).__name__}: {exc}; it is damaged or not a "
            f"{suffix} checkpoint. {SAVE_WEIGHTS_HINT}"
        ) from exc
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights file {path} does not hold a flat tensor state dict")
    state = checkpoint_filter_fn(state, vit)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = vit.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or wrong:
        problems = [f"missing {missing[:4]}"] if missing else []
        problems += [
            f"shape mismatch {k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:4]
        ]
        detail = "; ".join(problems)
        raise BackboneError(
            f"weights file {path} does not fit backbone {name!r}: {detail}; pass weights saved from a {name!r} model"
        )
    vit.load_state_dict({k: state[k] for k in expected})
