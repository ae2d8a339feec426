"""Session worker for the faces preset: frontal face detection, batched.

Input {"image_b64": base64 PNG/JPEG bytes} or {"file": "..."}, and optionally "min_size" (the
smallest face in pixels, default 30). A file is an absolute path under the node's allowed roots
or an upload id (POST /v1/files): the node checks it and hands this worker its resolved path,
which is checked again here against the folders the node names in GPULANE_ALLOWED_ROOTS
(defence in depth: without them, file inputs are refused). Output {"faces": [{"x", "y", "w",
"h"}], "count", "width", "height"}. An image that does not decode fails only its own task.

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

from gpulane.protocol import ENV_ALLOWED_ROOTS
from gpulane.worker import Context, TaskError, serve

MAX_SIDE = 1024  # larger images are scaled down to this for detection (boxes scaled back)
MAX_BYTES = 32 << 20


def load(ctx: Context) -> Cascade:
    return Cascade(data.lbp_frontal_face_cascade_filename())


def _allowed_roots() -> list[str]:
    raw = os.environ.get(ENV_ALLOWED_ROOTS, "")
    return [os.path.realpath(d) for d in raw.split(os.pathsep) if d.strip()]


def _read_file(path: Any) -> bytes:
    if not isinstance(path, str) or not os.path.isabs(path):
        raise TaskError("bad_input", "input.file must be an absolute path or an upload id")
    roots = _allowed_roots()
    if not roots:
        raise TaskError("bad_input", f"file inputs are off: {ENV_ALLOWED_ROOTS} is not set (a "
                        "node sets it; run this worker under gpulane), or send image_b64")
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, d]) == d for d in roots):
        raise TaskError("bad_input", f"input.file {path!r} is outside the node's allowed "
                        f"roots {roots}")
    try:
        with open(real, "rb") as f:
            return f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise TaskError("bad_input", f"input.file {path!r} is not on this node: an upload "
                        "lives on the node that received it (put files_dir on storage every "
                        "node mounts), and an upload past its retention is gone") from None
    except OSError as exc:
        raise TaskError("bad_input", f"cannot read input.file {path!r}: {exc.strerror}") from None


def _image_bytes(inp: Any) -> bytes:
    if not isinstance(inp, dict) or ("image_b64" in inp) == ("file" in inp):
        raise TaskError("bad_input", 'input must have exactly one of "image_b64" (base64 '
                        'PNG/JPEG) and "file" (a path under the allowed roots, or an upload id)')
    if "file" in inp:
        raw = _read_file(inp["file"])
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
