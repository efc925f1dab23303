"""The one preprocessing path: calibration, verification and every runtime's probe call this.

A model quantized on tensors that differ from what inference feeds (another
resize, padding value, colour order or scale) loses accuracy silently, so
there is exactly one implementation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_deploy.pipeline.errors import InputError


@dataclass(frozen=True)
class Preprocess:
    imgsz: int
    layout: str = "NCHW"  # or "NHWC", per target
    pad_value: int = 114
    scale: float = 1 / 255.0
    rgb: bool = True

    def params(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Letterbox:
    """How an original image maps into the model input; undone on predicted boxes."""

    ratio: float
    pad_x: float
    pad_y: float
    width: int
    height: int

    def to_original(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        out = boxes_xyxy.astype(np.float32).copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.ratio
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.ratio
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.height)
        return out


def read_image(path: Path) -> np.ndarray | None:
    """BGR uint8 image, or None when the file is not a readable image."""
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return image


def letterbox(image_bgr: np.ndarray, pre: Preprocess) -> tuple[np.ndarray, Letterbox]:
    """Resizes keeping aspect ratio and pads to a square, centred, as Ultralytics does."""
    h, w = image_bgr.shape[:2]
    ratio = min(pre.imgsz / h, pre.imgsz / w)
    new_w, new_h = int(round(w * ratio)), int(round(h * ratio))
    pad_x, pad_y = (pre.imgsz - new_w) / 2, (pre.imgsz - new_h) / 2
    if (new_w, new_h) != (w, h):
        image_bgr = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(pad_y - 0.1)), int(round(pad_y + 0.1))
    left, right = int(round(pad_x - 0.1)), int(round(pad_x + 0.1))
    out = cv2.copyMakeBorder(image_bgr, top, bottom, left, right, cv2.BORDER_CONSTANT,
                             value=(pre.pad_value,) * 3)
    return out, Letterbox(ratio=ratio, pad_x=left, pad_y=top, width=w, height=h)


def to_tensor(images_bgr: list[np.ndarray], pre: Preprocess) -> tuple[np.ndarray, list[Letterbox]]:
    """A float32 batch in the target's layout, and each image's letterbox."""
    boxes, letterboxes = [], []
    for image in images_bgr:
        if image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"expected a 3-channel image, got shape {image.shape}")
        padded, lb = letterbox(image, pre)
        boxes.append(padded[..., ::-1] if pre.rgb else padded)
        letterboxes.append(lb)
    batch = np.stack(boxes).astype(np.float32) * np.float32(pre.scale)
    if pre.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch), letterboxes


def load_tensor(path: Path, pre: Preprocess) -> tuple[np.ndarray, Letterbox]:
    image = read_image(path)
    if image is None:
        raise InputError(f"not a readable image: {path}")
    batch, (lb,) = to_tensor([image], pre)
    return batch, lb
