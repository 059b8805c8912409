"""The ONNX model contract: metadata, loading, and the preflight check against a run recipe.

A model carries its contract as ONNX metadata props `kintsugi.<field>` with JSON-encoded values (see
`ModelSpec`). Models exported elsewhere (Avizo, a colleague's script) lack them; the recipe then supplies
the missing fields as an override, merged over whatever the file declares. The loader checks the
declared contract against the graph itself (rank, layout, channel and class counts) so a wrong model is
a clear error at preflight, never a crash or silent garbage in the middle of a run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kintsugi_daemon.inference.session import create_session

__all__ = [
    "BUILTIN_MODELS",
    "CANONICAL_CLASSES",
    "METADATA_PREFIX",
    "OUTSIDE_LABEL",
    "SHIPPED_INT8_MODEL",
    "SHIPPED_MODEL",
    "ClassGreyStatistics",
    "ModelError",
    "ModelLoadError",
    "ModelMismatch",
    "ModelSpec",
    "Normalisation",
    "SegmentationModel",
    "check_against_recipe",
    "decode_metadata",
    "load_model",
    "resolve_model",
]

# DESIGN.md's canonical class names and label values (the daemon never imports the simulator's copy).
CANONICAL_CLASSES: dict[str, int] = {"pore": 0, "unfilled_pore": 1, "active": 2, "cbd": 3, "collector": 4}
# Pixels outside the specimen (above its surface, past its edge): never a material class; training and
# metrics ignore them (DESIGN.md).
OUTSIDE_LABEL = 255
METADATA_PREFIX = "kintsugi."
# The model the daemon and `kintsugi segment` use unless told otherwise (recipe `model = "builtin"`).
SHIPPED_MODEL = Path(__file__).parent / "models" / "kintsugi-unet.onnx"
# Its int8 twin (`kintsugi quantize`, scripts/quantize_shipped_model.sh): recipe `model = "builtin-int8"`.
SHIPPED_INT8_MODEL = Path(__file__).parent / "models" / "kintsugi-unet-int8.onnx"
BUILTIN_MODELS = {"builtin": SHIPPED_MODEL, "builtin-int8": SHIPPED_INT8_MODEL}
# A recipe pixel size further than this from the training data's is a different image scale.
PIXEL_SIZE_TOLERANCE = 0.20

_STRICT = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)


class ModelError(ValueError):
    """Base of every model-contract error (a ValueError: the CLI reports it as a usage error)."""


class ModelLoadError(ModelError):
    """The file is missing, not ONNX, or its declared contract does not fit the graph."""


class ModelMismatch(ModelError):
    """The model is valid but does not fit this run (detectors, classes, pixel size)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("model does not match the run: " + "; ".join(self.problems))


class Normalisation(BaseModel):
    """x = (grey / 65535 - mean) / std for one input channel."""

    model_config = _STRICT
    mean: float
    std: float = Field(gt=0)


class ClassGreyStatistics(BaseModel):
    """One class's grey levels in the training data, per input channel (raw 0..1): `grey_match.py`."""

    model_config = _STRICT
    mean: list[float]
    std: list[float]
    pixels: int = Field(default=0, ge=0)


class ModelSpec(BaseModel):
    """The contract a segmentation model declares (metadata props `kintsugi.<field>`)."""

    model_config = _STRICT
    classes: list[str] = Field(min_length=1)  # output channel k is class classes[k]
    channels: list[str] = Field(min_length=1)  # input channel c is detector channels[c]
    normalisation: list[Normalisation]
    pixel_size_m: float = Field(gt=0)
    tile: int = Field(gt=0)  # network input side the model runs at, halos included
    halo: int = Field(ge=0)  # receptive-field radius: context each kept pixel needs
    stride: int = Field(ge=1)  # input H and W must be multiples of it
    layout: Literal["NCHW", "NHWC"]
    # Peak activation memory per input pixel, measured at export; the tiler sizes tiles from it.
    activation_bytes_per_px: int | None = Field(default=None, gt=0)
    training: dict[str, Any] = Field(default_factory=dict)
    version: str = "unspecified"
    # Per class, the training pixels' grey mean and spread: the confidence's check that a slice looks like
    # the training data (`grey_match.py`). Models without it get the softmax confidence alone.
    grey_statistics: dict[str, ClassGreyStatistics] | None = None

    @field_validator("classes")
    @classmethod
    def _canonical_classes(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in CANONICAL_CLASSES]
        if unknown:
            raise ValueError(
                f"unknown class name(s) {unknown}; canonical names are {list(CANONICAL_CLASSES)}"
            )
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate class names in {v}")
        return v

    @field_validator("channels")
    @classmethod
    def _distinct_channels(cls, v: list[str]) -> list[str]:
        if any(not c.strip() for c in v) or len({c.casefold() for c in v}) != len(v):
            raise ValueError(f"channel names must be non-empty and distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if len(self.normalisation) != len(self.channels):
            raise ValueError(
                f"normalisation has {len(self.normalisation)} entries for {len(self.channels)} channels"
            )
        if self.tile % self.stride:
            raise ValueError(f"tile {self.tile} is not a multiple of stride {self.stride}")
        for name, stat in (self.grey_statistics or {}).items():
            if name not in self.classes or not len(stat.mean) == len(stat.std) == len(self.channels):
                raise ValueError(
                    f"grey_statistics.{name}: a class of the model with one mean and std per channel "
                    f"({len(self.channels)}) is required"
                )
        if self.tile <= 2 * self.effective_halo:
            raise ValueError(
                f"tile {self.tile} leaves no centre inside a halo of {self.effective_halo} px on each side"
            )
        return self

    @property
    def effective_halo(self) -> int:
        """The halo rounded up to the stride, so every tile origin stays on the network's pooling grid."""
        return -(-self.halo // self.stride) * self.stride

    def to_metadata(self) -> dict[str, str]:
        """Metadata props for `onnx.helper.set_model_props` when exporting a model."""
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in self.model_dump(mode="json").items()}

    @classmethod
    def required_keys(cls) -> list[str]:
        return [name for name, f in cls.model_fields.items() if f.is_required()]


@dataclass(frozen=True)
class SegmentationModel:
    """A loaded model: its contract plus an onnxruntime session, run in NCHW whatever its layout."""

    path: Path
    spec: ModelSpec
    session: ort.InferenceSession
    input_name: str
    output_name: str
    tile_hw: tuple[int, int]  # the spatial size the tiler feeds (fixed by the graph or the spec)
    fixed_shape: bool  # the graph accepts only tile_hw
    max_batch: int | None  # None: any batch size

    @property
    def threads(self) -> int:
        """The session's intra-op threads: the budget the tiler's post-processing shares too."""
        return max(1, int(self.session.get_session_options().intra_op_num_threads))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits [N, K, H, W] for a normalised float32 batch [N, C, H, W]."""
        x = np.ascontiguousarray(batch.transpose(0, 2, 3, 1) if self.spec.layout == "NHWC" else batch)
        (y,) = self.session.run([self.output_name], {self.input_name: x.astype(np.float32, copy=False)})
        out = np.asarray(y)
        if self.spec.layout == "NHWC":
            out = out.transpose(0, 3, 1, 2)
        expected = (batch.shape[0], len(self.spec.classes), *batch.shape[2:])
        if out.shape != expected:
            raise ModelLoadError(
                f"{self.path.name}: output shape {out.shape} (as NCHW) for input {batch.shape}; "
                f"expected {expected}: the network must return logits at its input resolution"
            )
        return out


def decode_metadata(path: Path, props: Mapping[str, str]) -> dict[str, Any]:
    """Every `kintsugi.*` prop JSON-decoded, keyed without the prefix (other tools' props are skipped)."""
    fields: dict[str, Any] = {}
    for key, raw in props.items():
        if not key.startswith(METADATA_PREFIX):
            continue
        try:
            fields[key.removeprefix(METADATA_PREFIX)] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path}: metadata {key} is not valid JSON ({exc}): {raw[:80]!r}") from exc
    return fields


def _read_metadata(path: Path, session: ort.InferenceSession) -> dict[str, Any]:
    known = set(ModelSpec.model_fields)
    decoded = decode_metadata(path, session.get_modelmeta().custom_metadata_map)
    # newer contract fields (and extras such as the architecture) are not part of the spec
    return {k: v for k, v in decoded.items() if k in known}


def _merge(fields: dict[str, Any], override: ModelSpec | Mapping[str, Any] | None) -> dict[str, Any]:
    if override is None:
        return fields
    if isinstance(override, ModelSpec):
        return {**fields, **override.model_dump()}
    # The recipe may spell keys either way; `kintsugi.tile` and `tile` mean the same.
    return {**fields, **{k.removeprefix(METADATA_PREFIX): v for k, v in override.items()}}


def _spec_from(path: Path, merged: dict[str, Any]) -> ModelSpec:
    unknown = sorted(set(merged) - set(ModelSpec.model_fields))
    if unknown:  # only an override can bring these (metadata is filtered): a typo in the recipe
        keys = ", ".join(METADATA_PREFIX + k for k in unknown)
        raise ModelLoadError(
            f"{path}: unknown model contract key(s) {keys}; known: {list(ModelSpec.model_fields)}"
        )
    missing = [k for k in ModelSpec.required_keys() if k not in merged]
    if missing:
        keys = ", ".join(METADATA_PREFIX + k for k in missing)
        raise ModelLoadError(
            f"{path}: model metadata lacks {keys}; export the model with them or supply them in the "
            "recipe's model override"
        )
    try:
        return ModelSpec.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{METADATA_PREFIX}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ModelLoadError(f"{path}: invalid model metadata: {problems}") from exc


def _dim(d: object) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _check_graph(path: Path, spec: ModelSpec, session: ort.InferenceSession) -> SegmentationModel:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"{path}: expected one input tensor, the graph has {len(inputs)}")
    inp, out = inputs[0], outputs[0]
    if inp.type != "tensor(float)":
        raise ModelLoadError(f"{path}: input {inp.name!r} is {inp.type}, expected tensor(float) (float32)")
    for role, arg in (("input", inp), ("output", out)):
        if len(arg.shape) != 4:
            raise ModelLoadError(
                f"{path}: {role} {arg.name!r} has rank {len(arg.shape)} (shape {arg.shape}); expected 4 "
                f"({spec.layout})"
            )
    c_axis, hw_axes = (1, (2, 3)) if spec.layout == "NCHW" else (3, (1, 2))
    other = 3 if c_axis == 1 else 1
    for role, arg, names in (("input", inp, spec.channels), ("output", out, spec.classes)):
        n = _dim(arg.shape[c_axis])
        if n is not None and n != len(names):
            hint = ""
            if _dim(arg.shape[other]) == len(names):
                hint = (
                    f"; the graph looks {'NHWC' if spec.layout == 'NCHW' else 'NCHW'}: check kintsugi.layout"
                )
            raise ModelLoadError(
                f"{path}: {role} {arg.name!r} shape {arg.shape} has {n} channels on the {spec.layout} "
                f"channel axis but the metadata declares {len(names)} ({', '.join(names)}){hint}"
            )
    h, w = (_dim(inp.shape[a]) for a in hw_axes)
    fixed = h is not None and w is not None
    if fixed:
        assert h is not None and w is not None
        tile_hw = (h, w)
        for side in tile_hw:
            if side % spec.stride or side <= 2 * spec.effective_halo:
                raise ModelLoadError(
                    f"{path}: fixed input size {h}x{w} does not fit stride {spec.stride} and halo "
                    f"{spec.effective_halo}"
                )
    else:
        tile_hw = (spec.tile, spec.tile)
    return SegmentationModel(
        path=path,
        spec=spec,
        session=session,
        input_name=inp.name,
        output_name=out.name,
        tile_hw=tile_hw,
        fixed_shape=fixed,
        max_batch=_dim(inp.shape[0]),
    )


def resolve_model(name: str | Path) -> Path:
    """A recipe's `model`: a built-in name (`builtin`, `builtin-int8`) or a path to an ONNX file."""
    return BUILTIN_MODELS.get(str(name), Path(name))


def load_model(
    path: Path | str,
    *,
    override: ModelSpec | Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> SegmentationModel:
    """Open an ONNX segmentation model and check its contract (metadata merged with `override`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(
            f"model file {path} does not exist" if not path.exists() else f"{path} is not a file"
        )
    try:
        session = create_session(path, threads)
    except Exception as exc:  # onnxruntime raises its own pybind types for every parse failure
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path} is not a readable ONNX model: {first}") from exc
    spec = _spec_from(path, _merge(_read_metadata(path, session), override))
    return _check_graph(path, spec, session)


def check_against_recipe(
    spec: ModelSpec,
    detectors: Sequence[str],
    required_classes: Sequence[str],
    pixel_size_m: float | None,
) -> None:
    """Raise `ModelMismatch` naming every difference that would make this model wrong for the run.

    The recipe's detectors may come in any order and include extra ones: channels are mapped by name.
    """
    problems: list[str] = []
    imaged = {d.casefold() for d in detectors}
    missing = [c for c in spec.channels if c.casefold() not in imaged]
    if missing:
        problems.append(
            f"the model needs detector(s) {', '.join(missing)} which the run does not image "
            f"(run detectors: {', '.join(detectors) or 'none'})"
        )
    absent = [c for c in required_classes if c not in spec.classes]
    if absent:
        problems.append(
            f"the adaptive logic needs class(es) {', '.join(absent)} which the model does not output "
            f"(model classes: {', '.join(spec.classes)})"
        )
    if pixel_size_m is not None:
        if not math.isfinite(pixel_size_m) or pixel_size_m <= 0:
            problems.append(f"run pixel size {pixel_size_m} m is not a positive number")
        else:
            rel = abs(pixel_size_m - spec.pixel_size_m) / spec.pixel_size_m
            if rel > PIXEL_SIZE_TOLERANCE:
                problems.append(
                    f"run pixel size {pixel_size_m * 1e9:.1f} nm differs from the model's "
                    f"{spec.pixel_size_m * 1e9:.1f} nm by {rel:.0%} (more than {PIXEL_SIZE_TOLERANCE:.0%})"
                )
    if problems:
        raise ModelMismatch(problems)
