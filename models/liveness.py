# Passive face anti-spoofing with MiniFASNet.
#
# The network architecture (MiniFASNetV2, MiniFASNetV1SE) and the pretrained
# weights it loads (2.7_80x80_MiniFASNetV2.pth, 4_0_0_80x80_MiniFASNetV1SE.pth)
# are Minivision's, published in Silent-Face-Anti-Spoofing
# (https://github.com/minivision-ai/Silent-Face-Anti-Spoofing) under the
# Apache License 2.0. This file is faceserve's own implementation of that
# published architecture and preprocessing; see models/NOTICE-liveness.md.
"""Passive liveness (anti-spoofing) scores for detected faces, without Ray.

Two small CNNs look at the face with different amounts of context around it:
MiniFASNetV2 at 2.7 times the detector box and MiniFASNetV1SE at 4.0 times
(the moire, screen edges and paper borders of a replayed face show up in the
surroundings). Each outputs 3-class logits; the live score of a face is the
mean over both models of the softmax probability of class 1 ("live").

Preprocessing, as Minivision trained and ran the models (their
``src/generate_patches.py`` CropImage, ``src/data_io/functional.py``
to_tensor, ``src/anti_spoof_predict.py`` and ``test.py``):

* box: upstream's detector reports (x, y, w, h) with ``w = int(right - left
  + 1)``; we convert our (x1, y1, x2, y2) the same way.
* crop: the box is scaled by ``scale`` about its centre, keeping the box's
  aspect ratio (the crop is NOT made square); the scale is first lowered, if
  needed, so the crop fits in the image ((W-1)/w and (H-1)/h); a crop that
  sticks out of the image is shifted back inside rather than clipped or
  padded; corners are truncated to int and the inclusive pixel range
  [x1..x2] x [y1..y2] is resized to 80x80 with bilinear interpolation
  (``cv2.resize`` default), squashing the aspect to 1:1.
* colour: BGR (upstream reads frames with ``cv2.imread``).
* tensor: float32 CHW with raw 0..255 values -- upstream's to_tensor does
  NOT divide by 255 and there is no mean/std normalisation.
* output: softmax per model; the per-model probabilities are averaged.

Upstream's demo also resizes the whole frame to a 3:4 aspect ratio before
detecting; because the crop keeps the box's aspect and is then resized to
80x80 anyway, that only matters for crops that hit the image border, and we
do not do it.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.weights import WeightsError

__all__ = [
    "CROP_SIZE",
    "DEFAULT_LIVE_THRESHOLD",
    "LIVE_CLASS",
    "LIVENESS_SPECS",
    "LivenessModel",
    "LivenessSpec",
    "build_minifasnet",
    "liveness_crop",
]

CROP_SIZE = 80
LIVE_CLASS = 1
NUM_CLASSES = 3
# A face is judged live when its averaged class-1 probability reaches this.
# Measured on the shared test images (tests/unit/test_liveness.py, YuNet
# boxes): live image_T1 0.9999, spoofs image_F1 0.223 and image_F2 0.0026.
# p(live) >= 0.5 also implies upstream's own rule (argmax of the averaged
# probabilities is class 1), so this is never looser than upstream's demo.
DEFAULT_LIVE_THRESHOLD = 0.5


# --------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------
# MiniFASNet is a pruned MobileFaceNet: a strided 3x3 stem, a depthwise 3x3,
# then three "down" inverted-bottleneck blocks (stride 2), each followed by a
# stage of residual inverted bottlenecks, and a global depthwise head. The
# pruning left every bottleneck with its own hidden width; the tables below
# list them. Module names mirror the released state dicts so they load with
# strict=True.
_STEM = 32
_HEAD = 512
_EMBEDDING = 128
_DOWN_HIDDEN = (103, 231, 308)  # hidden widths of conv_23, conv_34, conv_45
_STAGE_WIDTH = (64, 128, 128)  # channels through conv_3, conv_4, conv_5

# Hidden widths of the residual blocks in conv_3, conv_4, conv_5.
_RESIDUAL_HIDDEN = {
    "V1": ((13, 26, 13, 52), (154, 52, 26, 52, 26, 26), (26, 26)),
    "V2": ((13, 13, 13, 13), (231, 52, 26, 77, 26, 26), (26, 26)),
}


class _ConvUnit(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional per-channel PReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
        groups: int = 1, act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        if act:
            self.prelu = nn.PReLU(cout)
        self._act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.prelu(x) if self._act else x


class _SqueezeExcite(nn.Module):
    """Channel gate: global average -> 1x1 reduce -> BN -> ReLU -> 1x1 expand -> BN -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        inner = channels // reduction
        self.fc1 = nn.Conv2d(channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.fc2 = nn.Conv2d(inner, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = F.relu(self.bn1(self.fc1(gate)))
        gate = torch.sigmoid(self.bn2(self.fc2(gate)))
        return x * gate


class _Bottleneck(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, optional SE, optional skip."""

    def __init__(
        self, cin: int, hidden: int, cout: int, stride: int, residual: bool, se: bool = False,
    ) -> None:
        super().__init__()
        self.conv = _ConvUnit(cin, hidden)
        self.conv_dw = _ConvUnit(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden)
        self.project = _ConvUnit(hidden, cout, act=False)
        if se:
            self.se_module = _SqueezeExcite(cout)
        self._residual = residual
        self._se = se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        if not self._residual:
            return y
        if self._se:
            y = self.se_module(y)
        return x + y


class _Stage(nn.Module):
    """A run of residual bottlenecks at constant width; with ``se`` the last has an SE gate."""

    def __init__(self, width: int, hiddens: Sequence[int], se: bool) -> None:
        super().__init__()
        last = len(hiddens) - 1
        self.model = nn.Sequential(
            *(
                _Bottleneck(width, h, width, stride=1, residual=True, se=se and i == last)
                for i, h in enumerate(hiddens)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MiniFASNet(nn.Module):
    """MiniFASNet for 80x80 inputs (the head's depthwise kernel is 5x5)."""

    def __init__(self, variant: str, se: bool, num_classes: int = NUM_CLASSES,
                 input_size: int = CROP_SIZE) -> None:
        super().__init__()
        if variant not in _RESIDUAL_HIDDEN:
            raise ValueError(f"unknown MiniFASNet variant {variant!r}")
        hidden = _RESIDUAL_HIDDEN[variant]
        w1, w2, w3 = _STAGE_WIDTH
        self.conv1 = _ConvUnit(3, _STEM, kernel=3, stride=2, padding=1)
        self.conv2_dw = _ConvUnit(_STEM, _STEM, kernel=3, padding=1, groups=_STEM)
        self.conv_23 = _Bottleneck(_STEM, _DOWN_HIDDEN[0], w1, stride=2, residual=False)
        self.conv_3 = _Stage(w1, hidden[0], se)
        self.conv_34 = _Bottleneck(w1, _DOWN_HIDDEN[1], w2, stride=2, residual=False)
        self.conv_4 = _Stage(w2, hidden[1], se)
        self.conv_45 = _Bottleneck(w2, _DOWN_HIDDEN[2], w3, stride=2, residual=False)
        self.conv_5 = _Stage(w3, hidden[2], se)
        self.conv_6_sep = _ConvUnit(w3, _HEAD)
        # Four stride-2 steps take 80 to 5: a 5x5 depthwise conv pools each channel.
        head_kernel = (input_size + 15) // 16
        self.conv_6_dw = _ConvUnit(_HEAD, _HEAD, kernel=head_kernel, groups=_HEAD, act=False)
        self.linear = nn.Linear(_HEAD, _EMBEDDING, bias=False)
        self.bn = nn.BatchNorm1d(_EMBEDDING)
        self.prob = nn.Linear(_EMBEDDING, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.conv1, self.conv2_dw, self.conv_23, self.conv_3, self.conv_34,
                      self.conv_4, self.conv_45, self.conv_5, self.conv_6_sep, self.conv_6_dw):
            x = block(x)
        x = self.bn(self.linear(torch.flatten(x, 1)))
        return self.prob(x)  # dropout (training only) sat between bn and prob


def build_minifasnet(arch: str) -> MiniFASNet:
    """``"MiniFASNetV2"`` or ``"MiniFASNetV1SE"`` (also V1 and V2SE for completeness)."""
    table = {
        "MiniFASNetV1": ("V1", False),
        "MiniFASNetV2": ("V2", False),
        "MiniFASNetV1SE": ("V1", True),
        "MiniFASNetV2SE": ("V2", True),
    }
    if arch not in table:
        raise ValueError(f"unknown MiniFASNet architecture {arch!r}; known: {sorted(table)}")
    variant, se = table[arch]
    return MiniFASNet(variant, se)


# --------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------
def _as_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"image is too small: {arr.shape[1]}x{arr.shape[0]}")
    return arr


def crop_window(
    image_size: tuple[int, int], box: Sequence[float], scale: float
) -> tuple[int, int, int, int]:
    """Inclusive pixel window ``(x1, y1, x2, y2)`` that ``liveness_crop`` resizes.

    ``image_size`` is ``(width, height)``; ``box`` is our ``(x1, y1, x2, y2)``.
    """
    src_w, src_h = int(image_size[0]), int(image_size[1])
    if len(box) != 4:
        raise ValueError(f"box must be (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not np.isfinite([x1, y1, x2, y2]).all():
        raise ValueError(f"box has non-finite coordinates: {box!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    # Upstream's detector wrapper: [int(left), int(top), int(right-left+1), int(bottom-top+1)].
    bx, by = int(x1), int(y1)
    bw, bh = int(x2 - x1 + 1), int(y2 - y1 + 1)
    if bw <= 0 or bh <= 0:
        raise ValueError(f"box is empty: {box!r}")

    s = min(float(scale), (src_h - 1) / bh, (src_w - 1) / bw)
    cw, ch = bw * s, bh * s
    cx, cy = bx + bw / 2, by + bh / 2
    left, right = cx - cw / 2, cx + cw / 2
    top, bottom = cy - ch / 2, cy + ch / 2
    # Shift (never shrink) a window that leaves the image back inside it.
    if left < 0:
        right, left = right - left, 0.0
    if top < 0:
        bottom, top = bottom - top, 0.0
    if right > src_w - 1:
        left, right = left - (right - (src_w - 1)), float(src_w - 1)
    if bottom > src_h - 1:
        top, bottom = top - (bottom - (src_h - 1)), float(src_h - 1)
    # Boxes lying wholly outside the image could still leave a corner out; clamp.
    ix1 = min(max(int(left), 0), src_w - 1)
    iy1 = min(max(int(top), 0), src_h - 1)
    ix2 = min(max(int(right), ix1), src_w - 1)
    iy2 = min(max(int(bottom), iy1), src_h - 1)
    return ix1, iy1, ix2, iy2


def liveness_crop(
    rgb: np.ndarray, box: Sequence[float], scale: float, size: int = CROP_SIZE
) -> np.ndarray:
    """The ``(size, size, 3)`` uint8 patch a MiniFASNet model sees, in **BGR** order.

    ``rgb`` is the decoded image (H, W, 3) uint8 in RGB order (an alpha
    channel is dropped); ``box`` is the detector's ``(x1, y1, x2, y2)``.
    See the module docstring for the exact geometry.
    """
    img = _as_rgb(rgb)
    h, w = img.shape[:2]
    x1, y1, x2, y2 = crop_window((w, h), box, scale)
    patch = img[y1 : y2 + 1, x1 : x2 + 1]
    patch = cv2.resize(patch, (int(size), int(size)), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(patch[:, :, ::-1])  # RGB -> BGR


# --------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------
class LivenessSpec:
    """One model of the ensemble: manifest name, architecture, crop scale."""

    __slots__ = ("name", "arch", "scale")

    def __init__(self, name: str, arch: str, scale: float) -> None:
        self.name, self.arch, self.scale = name, arch, float(scale)

    def __repr__(self) -> str:
        return f"LivenessSpec({self.name!r}, {self.arch!r}, scale={self.scale})"


LIVENESS_SPECS: tuple[LivenessSpec, ...] = (
    LivenessSpec("minifasnet_v2", "MiniFASNetV2", 2.7),
    LivenessSpec("minifasnet_v1se", "MiniFASNetV1SE", 4.0),
)

_THREADS_LOCK = threading.Lock()


def load_state_dict_strict(model: nn.Module, path: Path | str) -> None:
    """Load a released (DataParallel, ``module.``-prefixed) state dict with strict=True."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated/garbage file
        raise WeightsError(f"cannot read liveness weights {path}: {exc}", file=str(path)) from exc
    if not isinstance(state, Mapping):
        raise WeightsError(f"liveness weights {path} are not a state dict", file=str(path))
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"liveness weights {path} do not fit {type(model).__name__}: {exc}", file=str(path)
        ) from exc


def _to_opencv(model: nn.Module) -> cv2.dnn.Net:
    """The loaded torch model as an OpenCV DNN net (ONNX export in memory,
    any batch size)."""
    import io
    import warnings

    buf = io.BytesIO()
    example = torch.zeros((1, 3, CROP_SIZE, CROP_SIZE), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model.cpu().eval(), (example,), buf, input_names=["crops"], output_names=["logits"],
                          dynamic_axes={"crops": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    net = cv2.dnn.readNetFromONNX(np.frombuffer(buf.getvalue(), np.uint8))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    return net


class LivenessModel:
    """The two-model MiniFASNet ensemble.

    ``predict`` takes crops already cut by :func:`liveness_crop` (so that the
    detector side can send two small 80x80 patches per face instead of the
    whole image); ``score_faces`` does both steps for one image.

    ``num_threads`` calls ``torch.set_num_threads`` (process-wide) when not
    None; the default of 1 keeps one replica from taking every core.

    ``runtime="opencv"`` runs the same loaded weights on OpenCV's DNN
    module instead (each model exported to ONNX in memory once, at load):
    the same probabilities (largest difference ~1e-7 on random crops) for
    about a third of torch's CPU time on these small depthwise networks
    (benchmarks/bulk_worker_profile.py). The Liveness deployment and the bulk
    enrolment job use it; OpenCV's thread pool is sized by the caller
    (cv2.setNumThreads).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        models_dir: Path | str | None = None,
        *,
        num_threads: int | None = 1,
        allow_download: bool = True,
        max_batch: int = 64,
        specs: Sequence[LivenessSpec] = LIVENESS_SPECS,
        runtime: str = "torch",
    ) -> None:
        from models.weights import resolve_weights  # lazy: keeps import light

        if runtime not in ("torch", "opencv"):
            raise ValueError(f"runtime must be 'torch' or 'opencv', got {runtime!r}")
        if runtime == "opencv" and torch.device(device).type != "cpu":
            raise ValueError("runtime 'opencv' runs on the CPU only")

        if num_threads is not None:
            if int(num_threads) < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            with _THREADS_LOCK:
                torch.set_num_threads(int(num_threads))
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.device = torch.device(device)
        self.max_batch = int(max_batch)
        self.specs = tuple(specs)
        if len({s.scale for s in self.specs}) != len(self.specs):
            raise ValueError("liveness models must use distinct crop scales")
        self.weight_paths: dict[str, Path] = {}
        self._models: list[nn.Module] = []
        for spec in self.specs:
            resolved = resolve_weights(spec.name, models_dir=models_dir, allow_download=allow_download)
            model = build_minifasnet(spec.arch)
            load_state_dict_strict(model, resolved.path)
            model.eval().to(self.device)
            self.weight_paths[spec.name] = Path(resolved.path)
            self._models.append(model)
        self.runtime = runtime
        self._nets = [_to_opencv(m) for m in self._models] if runtime == "opencv" else []
        self._net_lock = threading.Lock()  # a cv2 Net runs one forward pass at a time

    @property
    def crop_specs(self) -> list[tuple[str, float]]:
        """``[(manifest name, crop scale), ...]``: the crops ``predict`` wants."""
        return [(s.name, s.scale) for s in self.specs]

    @property
    def scales(self) -> list[float]:
        return [s.scale for s in self.specs]

    def make_crops(self, rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> dict[float, np.ndarray]:
        """``{scale: (N, 80, 80, 3) uint8 BGR}`` for every box, ready for ``predict``."""
        img = _as_rgb(rgb)
        out = {}
        for scale in self.scales:
            crops = [liveness_crop(img, box, scale) for box in boxes]
            out[scale] = (np.stack(crops) if crops
                          else np.empty((0, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8))
        return out

    def _batch(self, crops_by_scale: Mapping[float, np.ndarray]) -> tuple[int, list[np.ndarray]]:
        if not isinstance(crops_by_scale, Mapping):
            raise ValueError("crops must be a mapping {scale: (N, 80, 80, 3) array}")
        by_scale = {float(k): v for k, v in crops_by_scale.items()}
        missing = [s for s in self.scales if s not in by_scale]
        if missing:
            raise ValueError(
                f"liveness crops missing for scale(s) {missing}; need {self.scales}"
            )
        arrays, n = [], None
        for scale in self.scales:
            arr = np.asarray(by_scale[scale])
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4 or arr.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
                raise ValueError(
                    f"liveness crops at scale {scale} must be (N, {CROP_SIZE}, {CROP_SIZE}, 3), "
                    f"got {arr.shape}"
                )
            if arr.dtype != np.uint8:
                raise ValueError(
                    f"liveness crops must be uint8, got {arr.dtype}"
                )
            if n is not None and arr.shape[0] != n:
                raise ValueError("liveness crops differ in count between scales")
            n = arr.shape[0]
            arrays.append(arr)
        return int(n or 0), arrays

    def predict_proba(self, crops_by_scale: Mapping[float, np.ndarray]) -> np.ndarray:
        """Ensemble-averaged class probabilities, ``(N, 3)`` float32 (class 1 = live)."""
        n, arrays = self._batch(crops_by_scale)
        total = np.zeros((n, NUM_CLASSES), dtype=np.float32)
        if n == 0:
            return total
        if self._nets:
            with self._net_lock:
                for net, arr in zip(self._nets, arrays):
                    # HWC uint8 BGR -> NCHW float32, values left in 0..255, as for torch.
                    net.setInput(np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32))
                    logits = np.asarray(net.forward(), dtype=np.float32).reshape(n, NUM_CLASSES)
                    e = np.exp(logits - logits.max(axis=1, keepdims=True))
                    total += e / e.sum(axis=1, keepdims=True)
            return total / len(self._nets)
        with torch.inference_mode():
            for model, arr in zip(self._models, arrays):
                for start in range(0, n, self.max_batch):
                    chunk = arr[start : start + self.max_batch]
                    # HWC uint8 BGR -> NCHW float32, values left in 0..255.
                    x = torch.from_numpy(np.ascontiguousarray(chunk.transpose(0, 3, 1, 2)))
                    x = x.to(self.device, dtype=torch.float32)
                    probs = torch.softmax(model(x), dim=1)
                    total[start : start + len(chunk)] += probs.float().cpu().numpy()
        return total / len(self._models)

    def predict(self, crops_by_scale: Mapping[float, np.ndarray]) -> np.ndarray:
        """Live scores ``(N,)`` float32 in [0, 1] for crops from :func:`liveness_crop`."""
        return self.predict_proba(crops_by_scale)[:, LIVE_CLASS].astype(np.float32)

    def score_faces(self, rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        """Live scores ``(N,)`` for the ``(x1, y1, x2, y2)`` boxes in one RGB image."""
        return self.predict(self.make_crops(rgb, boxes))
