"""Face embedders: SFace (ONNX, default), SFace with flip averaging, and
FaceNet/InceptionResnetV1 (torch).

Both take aligned RGB uint8 crops (N, S, S, 3) and return L2-normalised float32
rows, so cosine similarity is a dot product (and FAISS inner-product search
works directly).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.weights import ResolvedWeights, resolve_weights, verify_file

# Cosine-similarity threshold for "same person" with SFace on our crops.
# OpenCV documents 0.363 for SFace (cosine, LFW protocol). Measured on
# ../shared/faces/people (15 photos, 6 people; 16 same / 89 different pairs):
#   YuNet landmarks: lowest same-person 0.627, highest different-person 0.275
#   MTCNN landmarks: lowest same-person 0.662, highest different-person 0.258
#   tight 90-160 px face crops vs the full photos: same >= 0.83, others <= 0.27
# 0.363 lies inside the gap (margins about +0.26 / -0.09), so OpenCV's published
# value is kept rather than fitting our 15 photos. The different-person side
# has the smaller margin: a deployment wanting fewer false matches can raise it
# towards ~0.45 without losing any of our same-person pairs.
SFACE_DEFAULT_THRESHOLD = 0.363


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Cosine similarity of L2-normalised embeddings: (D,)x(D,) -> float,
    (N,D)x(D,) -> (N,), (N,D)x(M,D) -> (N,M)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.ndim == 1 and b.ndim == 1:
        return float(a @ b)
    if b.ndim == 1:
        return a @ b
    return a @ b.T


def _check_crops(crops: np.ndarray) -> np.ndarray:
    crops = np.asarray(crops)
    if crops.ndim == 3:  # a single crop
        crops = crops[None]
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.shape[1] != crops.shape[2] or crops.dtype != np.uint8:
        raise ValueError(f"embedder expects (N, S, S, 3) uint8 RGB crops, got {crops.shape} {crops.dtype}")
    return crops


def _resize_batch(crops: np.ndarray, size: int) -> np.ndarray:
    if crops.shape[1] == size:
        return crops
    interp = cv2.INTER_AREA if crops.shape[1] > size else cv2.INTER_LINEAR
    return np.stack([cv2.resize(c, (size, size), interpolation=interp) for c in crops])


def _resolve(name: str, weights_path: Path | str | None, **kw: Any) -> ResolvedWeights:
    return verify_file(name, weights_path) if weights_path is not None else resolve_weights(name, **kw)


class Embedder:
    name: str = "base"
    dim: int = 0
    input_size: int = 112  # the crop size the network runs at; other sizes are resized

    def embed(self, crops: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class SFaceEmbedder(Embedder):
    """OpenCV zoo SFace (face_recognition_sface_2021dec.onnx) on OpenCV's DNN module.

    The runtime is cv2.dnn on the graph edited to batch (_batchable_model):
    measured on this 2-core machine, one thread, CPU time per face at batch
    16: cv2.dnn 15.8 ms, onnxruntime 1.32 32.9 ms (ORT_ENABLE_ALL; BASIC and
    EXTENDED were slower still), for the same vectors (largest difference
    5e-7). cv2.FaceRecognizerSF itself runs one face per call (18.4 ms).

    Preprocessing follows OpenCV's FaceRecognizerSF::feature: blobFromImage
    with scale 1, mean 0, swapRB=true on a BGR crop, i.e. the network takes
    RGB float 0..255 NCHW. The (x - 127.5) / 128 normalisation is inside the
    graph (its first Sub/Mul nodes).
    """

    name = "sface"
    dim = 128
    input_size = 112

    def __init__(self, weights_path: Path | str | None = None, intra_op_threads: int | None = None) -> None:
        import threading

        self.weights = _resolve("sface", weights_path)
        model_bytes = self._batchable_model(self.weights.path)
        if intra_op_threads is not None:
            # OpenCV's pool is per process: a replica or job actor sizes it to
            # its CPUs here (the detector, in its own process, does the same).
            cv2.setNumThreads(int(intra_op_threads))
        self._net = cv2.dnn.readNetFromONNX(np.frombuffer(model_bytes, np.uint8))
        self._net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self._net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self._lock = threading.Lock()  # a Net runs one forward pass at a time

    @staticmethod
    def _batchable_model(path: Path) -> bytes:
        """The file has batch size fixed at 1 and lists its weights as graph
        inputs (old exporter), which stops a runtime from batching and from
        folding constants. Fix both in memory; the file stays as pinned."""
        import onnx

        model = onnx.load(str(path))
        graph = model.graph
        init_names = {init.name for init in graph.initializer}
        real_inputs = [i for i in graph.input if i.name not in init_names]
        del graph.input[:]
        graph.input.extend(real_inputs)
        for value in list(graph.input) + list(graph.output):
            dim0 = value.type.tensor_type.shape.dim[0]
            dim0.ClearField("dim_value")
            dim0.dim_param = "batch"
        return model.SerializeToString()

    def embed(self, crops: np.ndarray) -> np.ndarray:
        crops = _check_crops(crops)
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        crops = _resize_batch(crops, self.input_size)
        blob = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32)  # NHWC RGB -> NCHW
        with self._lock:
            self._net.setInput(blob)
            out = self._net.forward()
        return l2_normalize(out.reshape(len(crops), self.dim))


class SFaceFlipEmbedder(SFaceEmbedder):
    """SFace with flip averaging: the mean of the embeddings of the aligned
    crop and its mirror image, L2-normalised (test-time augmentation).

    Same weights, a different model id: its vectors are close to plain
    SFace's (cosine ~0.99 for the same crop) but not the same, so a
    collection holds one or the other, never both (moving a collection is
    serve_app/jobs/reembed.py). Measured on ../shared/faces/people (15
    photos, 6 people): lowest same-person 0.685 (SFace 0.662), highest
    different-person 0.279 (SFace 0.285), for twice SFace's embedding cost.
    """

    name = "sface_flip"

    def embed(self, crops: np.ndarray) -> np.ndarray:
        crops = _check_crops(crops)
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        both = super().embed(np.concatenate([crops, crops[:, :, ::-1]]))  # one batch of 2N
        return l2_normalize(both[: len(crops)] + both[len(crops):])


class FaceNetEmbedder(Embedder):
    """facenet-pytorch InceptionResnetV1 trained on VGGFace2 (512-d).

    Its weights are not shipped with the package; they are resolved by
    checksum (FACE_MODELS_DIR, then the cache, else downloaded from upstream).
    ``pretrained=False`` builds the network with random weights: only for
    exercising the code path offline, never for real matching.
    """

    name = "facenet"
    dim = 512
    input_size = 160

    def __init__(self, weights_path: Path | str | None = None, pretrained: bool = True,
                 device: str = "cpu", **resolve_kw: Any) -> None:
        import torch
        from facenet_pytorch import InceptionResnetV1

        self.pretrained = bool(pretrained)
        # Resolve before building the 27M-parameter network so a missing file fails fast.
        self.weights = _resolve("facenet_vggface2", weights_path, **resolve_kw) if pretrained else None
        self.device = torch.device(device)
        net = InceptionResnetV1(pretrained=None, classify=False)
        if self.weights is not None:
            state = torch.load(self.weights.path, map_location="cpu", weights_only=True)
            # The release carries the VGGFace2 classifier ("logits.*"); embeddings don't use it.
            state = {k: v for k, v in state.items() if not k.startswith("logits.")}
            net.load_state_dict(state)
        self._net = net.eval().to(self.device)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        import torch

        crops = _check_crops(crops)
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        crops = _resize_batch(crops, self.input_size)
        # facenet-pytorch's fixed_image_standardization: (x - 127.5) / 128, RGB.
        x = (crops.astype(np.float32) - 127.5) / 128.0
        tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device)
        with torch.inference_mode():
            out = self._net(tensor).cpu().numpy()
        return l2_normalize(out)


EMBEDDERS: dict[str, type[Embedder]] = {
    "sface": SFaceEmbedder, "sface_flip": SFaceFlipEmbedder, "facenet": FaceNetEmbedder}


def make_embedder(name: str, **kwargs: Any) -> Embedder:
    try:
        cls = EMBEDDERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown embedder {name!r}; choose one of {sorted(EMBEDDERS)}") from None
    return cls(**kwargs)
