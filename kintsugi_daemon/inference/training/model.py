"""The networks: a plain U-Net (and Avizo's ResNet18/VGG16-encoder U-Nets via smp), BatchNorm folding, the
receptive-field measurement that sets the halo, and the way back from an exported ONNX file to eager
PyTorch (for `--init builtin` fine-tuning and the onnxruntime-vs-PyTorch benchmark).

`TorchTiled` lets the daemon's tiler drive an eager network, so training validates exactly as the daemon
predicts (same padding, same tiles, same argmax).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx  # type: ignore[import-not-found, unused-ignore]
import torch  # type: ignore[import-not-found, unused-ignore]
from torch import Tensor, nn  # type: ignore[import-not-found, unused-ignore]
from torch.nn import functional as nnf  # type: ignore[import-not-found, unused-ignore]

from kintsugi_daemon.inference.contract import ModelSpec, decode_metadata

__all__ = [
    "Arch",
    "TorchTiled",
    "UNet",
    "build_model",
    "fold_batchnorm",
    "measure_receptive_radius",
    "model_stride",
    "read_onnx_metadata",
    "unet_from_onnx",
]

Arch = Literal["unet", "resnet18", "vgg16"]


class _ConvBlock(nn.Sequential):  # type: ignore[misc, unused-ignore]
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):  # type: ignore[misc, unused-ignore]
    """A plain U-Net: `depth` 2x2 max-pool downsamplings, channels base * 2**level, BatchNorm, ReLU."""

    def __init__(self, in_channels: int = 2, n_classes: int = 5, base: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.in_channels, self.n_classes, self.base, self.depth = in_channels, n_classes, base, depth
        self.enc = nn.ModuleList()
        cin = in_channels
        for level in range(depth):
            self.enc.append(_ConvBlock(cin, base << level))
            cin = base << level
        self.bottleneck = _ConvBlock(cin, base << depth)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(nn.ConvTranspose2d(base << (level + 1), base << level, 2, stride=2))
            self.dec.append(_ConvBlock(base << (level + 1), base << level))
        self.head = nn.Conv2d(base, n_classes, 1)

    @property
    def stride(self) -> int:
        return 1 << self.depth

    def forward(self, x: Tensor) -> Tensor:
        skips: list[Tensor] = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = nnf.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        out: Tensor = self.head(x)
        return out


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy in eval semantics with every Conv2d+BatchNorm2d pair folded into one biased Conv2d."""
    folded = copy.deepcopy(model).eval()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.Sequential):
                layers = list(child)
                for i in range(len(layers) - 1):
                    conv, bn = layers[i], layers[i + 1]
                    if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                        child[i] = nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                        child[i + 1] = nn.Identity()
            visit(child)

    visit(folded)
    return folded


def _folded_unet(in_channels: int, n_classes: int, base: int, depth: int) -> UNet:
    """A UNet whose blocks have biased convolutions and no BatchNorm: the shape of `fold_batchnorm`."""
    net = UNet(in_channels, n_classes, base, depth)
    for block in [*net.enc, net.bottleneck, *net.dec]:
        for i, layer in enumerate(list(block)):
            if isinstance(layer, nn.Conv2d):
                block[i] = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1, bias=True)
            elif isinstance(layer, nn.BatchNorm2d):
                block[i] = nn.Identity()
    net.eval()
    return net


def build_model(arch: Arch, in_channels: int, n_classes: int, base: int = 16, depth: int = 3) -> nn.Module:
    """The plain U-Net, or a ResNet18/VGG16-encoder U-Net (Avizo's architectures) via smp."""
    if arch == "unet":
        return UNet(in_channels, n_classes, base, depth)
    try:
        import segmentation_models_pytorch as smp  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise RuntimeError(
            f"--arch {arch} needs segmentation-models-pytorch: pip install segmentation-models-pytorch"
        ) from exc
    net: nn.Module = smp.Unet(
        encoder_name=arch, encoder_weights=None, in_channels=in_channels, classes=n_classes
    )
    return net


def model_stride(model: nn.Module) -> int:
    return model.stride if isinstance(model, UNet) else 32


def measure_receptive_radius(model: nn.Module, in_channels: int, stride: int, size: int = 0) -> int:
    """Receptive-field radius in pixels: the farthest input pixel with a non-zero gradient on the centre
    output pixel (eval mode, random input; two probes so that a dead ReLU cannot hide a path)."""
    size = size or max(256, 16 * stride)
    net = copy.deepcopy(model).eval()
    radius = 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(1, in_channels, size, size, generator=gen, requires_grad=True)
        y = net(x)
        c = size // 2
        y[0, :, c, c].sum().backward()
        assert x.grad is not None
        support = (x.grad.abs().sum(dim=(0, 1)) > 0).nonzero()
        if support.numel():
            radius = max(radius, int((support - c).abs().max()))
    if radius >= size // 2 - 1:
        raise RuntimeError("receptive field reaches the probe's border; measure with a larger size")
    return radius


def read_onnx_metadata(path: Path) -> dict[str, Any]:
    """All `kintsugi.*` props of an ONNX file (the contract plus extras such as the architecture)."""
    proto = onnx.load(str(path), load_external_data=False)
    return decode_metadata(path, {p.key: p.value for p in proto.metadata_props})


def unet_from_onnx(path: Path) -> UNet:
    """The eager PyTorch model (BatchNorm folded) holding exactly the weights of an exported UNet."""
    props = read_onnx_metadata(path)
    arch = props.get("architecture", {})
    if arch.get("arch") != "unet":
        raise ValueError(f"{path}: not an exported kintsugi UNet (architecture {arch or 'unknown'})")
    net = _folded_unet(
        len(props["channels"]), len(props["classes"]), int(arch["base_channels"]), int(arch["depth"])
    )
    model = onnx.load(str(path))
    weights = {
        init.name: torch.from_numpy(onnx.numpy_helper.to_array(init).copy())
        for init in model.graph.initializer
    }
    state = net.state_dict()
    missing = [k for k in state if k not in weights]
    if missing:
        raise ValueError(f"{path}: initializers missing for {missing[:4]}...")
    net.load_state_dict({k: weights[k] for k in state})
    net.eval()
    return net


@dataclass(frozen=True)
class TorchTiled:
    """An eager network in the shape the tiler drives (`tiling.TiledModel`); the net must be in eval mode."""

    net: nn.Module
    spec: ModelSpec

    @property
    def tile_hw(self) -> tuple[int, int]:
        return (self.spec.tile, self.spec.tile)

    @property
    def fixed_shape(self) -> bool:
        return False

    @property
    def max_batch(self) -> int | None:
        return None

    def run(self, batch: np.ndarray) -> np.ndarray:
        device = next(self.net.parameters()).device
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            out: np.ndarray = self.net(x).cpu().numpy()
        return out
