"""Session worker for the faces preset: frontal face detection, batched.

Input {"image_b64": base64 PNG/JPEG bytes} or {"path": "..."}, and optionally "min_size" (the
smallest face in pixels, default 30). A path is read only under the folders listed in
FACES_ALLOWED_DIRS (separated by os.pathsep); without it, path inputs are refused. Output
{"faces": [{"x", "y", "w", "h"}], "count", "width", "height"}. An image that does not decode
fails only its own task.

OpenCV decodes the image. Detection is scikit-image's LBP frontal-face cascade (OpenCV 5
dropped its Haar cascades): it runs on the CPU whatever device the worker was given.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

import cv2
import numpy as np
from skimage import data
from skimage.feature import Cascade

from gpulane.worker import Context, TaskError, serve

ALLOWED_ENV = "FACES_ALLOWED_DIRS"
MAX_SIDE = 1024  # larger images are scaled down to this for detection (boxes scaled back)
MAX_BYTES = 32 << 20


def load(ctx: Context) -> Cascade:
    return Cascade(data.lbp_frontal_face_cascade_filename())


def _allowed_dirs() -> list[str]:
    raw = os.environ.get(ALLOWED_ENV, "")
    return [os.path.realpath(d) for d in raw.split(os.pathsep) if d.strip()]


def _read_path(path: Any) -> bytes:
    if not isinstance(path, str) or not path:
        raise TaskError("bad_input", "input.path must be a non-empty string")
    allowed = _allowed_dirs()
    if not allowed:
        raise TaskError("bad_input", f"path inputs are off: set {ALLOWED_ENV} (folders "
                        f"separated by {os.pathsep!r}) in the preset's env or the node's "
                        "environment, or send image_b64")
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, d]) == d for d in allowed):
        raise TaskError("bad_input", f"input.path {path!r} is outside the folders in "
                        f"{ALLOWED_ENV}")
    try:
        with open(real, "rb") as f:
            return f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise TaskError("bad_input", f"cannot read input.path {path!r}: {exc.strerror}") from None


def _image_bytes(inp: Any) -> bytes:
    if not isinstance(inp, dict) or ("image_b64" in inp) == ("path" in inp):
        raise TaskError("bad_input", 'input must have exactly one of "image_b64" (base64 '
                        'PNG/JPEG) and "path"')
    if "path" in inp:
        raw = _read_path(inp["path"])
    else:
        if not isinstance(inp["image_b64"], str):
            raise TaskError("bad_input", "input.image_b64 must be a base64 string")
        try:
            raw = base64.b64decode(inp["image_b64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TaskError("bad_input", f"input.image_b64 is not valid base64: {exc}") from None
    if len(raw) > MAX_BYTES:
        raise TaskError("bad_input", f"the image is over {MAX_BYTES >> 20} MiB")
    return raw


def detect(detector: Cascade, inp: Any) -> dict[str, Any]:
    raw = _image_bytes(inp)
    min_size = inp.get("min_size", 30)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or not 8 <= min_size <= 4096:
        raise TaskError("bad_input", f"input.min_size must be an integer 8-4096, got {min_size!r}")
    gray = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE) if raw else None
    if gray is None:
        raise TaskError("bad_input", "the image does not decode (PNG or JPEG expected)")
    height, width = gray.shape
    scale = min(1.0, MAX_SIDE / max(height, width))
    if scale < 1.0:
        gray = cv2.resize(gray, (round(width * scale), round(height * scale)),
                          interpolation=cv2.INTER_AREA)
    side = max(8, round(min_size * scale))
    found = detector.detect_multi_scale(img=gray, scale_factor=1.2, step_ratio=1.5,
                                        min_size=(side, side), max_size=gray.shape)
    faces = [{"x": round(f["c"] / scale), "y": round(f["r"] / scale),
              "w": round(f["width"] / scale), "h": round(f["height"] / scale)} for f in found]
    return {"faces": faces, "count": len(faces), "width": width, "height": height}


def handle(inputs: list[Any], ctx: Context) -> list[Any]:
    outputs: list[Any] = []
    for inp in inputs:
        try:
            outputs.append(detect(ctx.model, inp))
        except TaskError as exc:
            outputs.append(exc)
    return outputs


if __name__ == "__main__":
    serve(load=load, handle=handle, batch=True)
