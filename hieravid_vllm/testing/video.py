"""Synthetic test videos with known structure (mp4 through OpenCV, fourcc ``mp4v``).

``write_scene_video`` writes a clip made of scenes with distinct static backgrounds (a colour
plus a scene-specific texture) and shapes moving inside each scene; the returned
:class:`SyntheticVideo` carries the planted scene boundaries (frame indices where a new scene
starts). ``write_static_video`` writes a clip whose frames are all identical and
``write_single_frame_video`` a one-frame clip. ``video_data_url`` turns a file into the
``data:video/mp4;base64,...`` URL that OpenAI-style ``video_url`` content parts accept, and
``read_video_frames`` decodes a clip into an RGB ``uint8`` array.

Only numpy and OpenCV are needed (no torch, no vLLM).
"""
from __future__ import annotations

import base64
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

# Backgrounds far apart in colour (BGR, as OpenCV writes) so scene cuts are unmistakable.
_PALETTE_BGR = [
    (40, 40, 200),    # red
    (200, 120, 30),   # blue
    (40, 180, 40),    # green
    (30, 200, 220),   # yellow
    (180, 40, 160),   # purple
    (200, 200, 200),  # light grey
    (20, 100, 160),   # brown/orange
    (140, 140, 20),   # teal
]
_TEXTURES = ("stripes_h", "stripes_v", "checker", "gradient", "rings", "diagonal")


@dataclass
class SyntheticVideo:
    """A clip written to ``path`` and what was planted in it."""

    path: Path
    num_frames: int
    width: int
    height: int
    fps: float
    #: first frame index of every scene after the first (the planted cuts)
    boundaries: list[int] = field(default_factory=list)
    #: ``(start, end)`` frame ranges (end exclusive) of every scene, in order
    scenes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def scene_starts(self) -> list[int]:
        return [s for s, _ in self.scenes]

    def data_url(self) -> str:
        return video_data_url(self.path)


def _cv2():
    import cv2  # imported lazily: only the writers need it

    return cv2


def _check_size(width: int, height: int) -> None:
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"width/height must be even and >= 16, got {width}x{height}")


def _background(texture: str, color: Sequence[int], width: int, height: int,
                rng: np.random.Generator) -> np.ndarray:
    """A static textured background: ``color`` modulated by a smooth pattern."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    period = float(rng.integers(12, 28))
    if texture == "stripes_h":
        pattern = (np.sin(2 * np.pi * yy / period) > 0).astype(np.float32)
    elif texture == "stripes_v":
        pattern = (np.sin(2 * np.pi * xx / period) > 0).astype(np.float32)
    elif texture == "checker":
        cell = int(period)
        pattern = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    elif texture == "gradient":
        pattern = (xx / max(width - 1, 1) + yy / max(height - 1, 1)) / 2.0
    elif texture == "rings":
        cy, cx = height / 2.0, width / 2.0
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        pattern = (np.sin(2 * np.pi * r / period) > 0).astype(np.float32)
    elif texture == "diagonal":
        pattern = (np.sin(2 * np.pi * (xx + yy) / period) > 0).astype(np.float32)
    else:  # pragma: no cover - internal
        raise ValueError(texture)
    base = np.asarray(color, dtype=np.float32)[None, None, :]
    # pattern in [0, 1] -> brightness factor in [0.6, 1.15]
    img = base * (0.6 + 0.55 * pattern[..., None])
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class _Mover:
    shape: str
    color: tuple[int, int, int]
    size: int
    pos: np.ndarray
    vel: np.ndarray

    def step(self, width: int, height: int) -> None:
        self.pos = self.pos + self.vel
        for axis, limit in ((0, width), (1, height)):
            lo, hi = self.size, limit - self.size
            if self.pos[axis] < lo or self.pos[axis] > hi:
                self.vel[axis] = -self.vel[axis]
                self.pos[axis] = float(np.clip(self.pos[axis], lo, hi))

    def draw(self, img: np.ndarray) -> None:
        cv2 = _cv2()
        x, y = int(round(self.pos[0])), int(round(self.pos[1]))
        if self.shape == "circle":
            cv2.circle(img, (x, y), self.size, self.color, thickness=-1)
        elif self.shape == "square":
            s = self.size
            cv2.rectangle(img, (x - s, y - s), (x + s, y + s), self.color, thickness=-1)
        else:  # triangle
            s = self.size
            pts = np.array([[x, y - s], [x - s, y + s], [x + s, y + s]], dtype=np.int32)
            cv2.fillPoly(img, [pts], self.color)


def _movers(rng: np.random.Generator, n: int, width: int, height: int,
            bg_color: Sequence[int]) -> list[_Mover]:
    movers = []
    short = min(width, height)
    for _ in range(n):
        size = max(3, int(short * rng.uniform(0.06, 0.12)))
        # contrasting colour: invert the background, plus a little variety
        color = tuple(int(255 - c + rng.integers(-30, 30)) % 256 for c in bg_color)
        pos = np.array([rng.uniform(size, width - size), rng.uniform(size, height - size)])
        speed = short * rng.uniform(0.02, 0.05)
        angle = rng.uniform(0, 2 * np.pi)
        vel = np.array([speed * np.cos(angle), speed * np.sin(angle)])
        shape = ("circle", "square", "triangle")[int(rng.integers(0, 3))]
        movers.append(_Mover(shape, color, size, pos, vel))
    return movers


def _split_scenes(num_frames: int, num_scenes: int,
                  scene_lengths: Sequence[int] | None) -> list[tuple[int, int]]:
    if scene_lengths is not None:
        lengths = [int(n) for n in scene_lengths]
        if any(n <= 0 for n in lengths) or sum(lengths) != num_frames:
            raise ValueError(f"scene_lengths {lengths} must be positive and sum to {num_frames}")
    else:
        if not 1 <= num_scenes <= num_frames:
            raise ValueError(f"num_scenes must be in [1, num_frames], got {num_scenes}")
        base, extra = divmod(num_frames, num_scenes)
        lengths = [base + (1 if i < extra else 0) for i in range(num_scenes)]
    scenes, start = [], 0
    for n in lengths:
        scenes.append((start, start + n))
        start += n
    return scenes


def _write_frames(path: Path, frames_bgr: Sequence[np.ndarray], fps: float) -> None:
    """Write frames atomically (temp file in the same folder, then rename)."""
    cv2 = _cv2()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames_bgr[0].shape[:2]
    fd, tmp = tempfile.mkstemp(suffix=".mp4", prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV VideoWriter (mp4v) failed to open " + tmp)
        for f in frames_bgr:
            writer.write(np.ascontiguousarray(f))
        writer.release()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _blocky_image(color: Sequence[int], width: int, height: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Flat background with a few 32x32 tiles on the 16-pixel macroblock grid: content mp4v
    reproduces exactly in key frames and P-frames alike (the static clip's last resort)."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = color
    inverse = tuple(255 - c for c in color)
    for k in range(3):
        y = int(rng.integers(0, max(1, height // 16))) * 16
        x = int(rng.integers(0, max(1, width // 16))) * 16
        img[y:y + 32, x:x + 32] = inverse if k % 2 == 0 else _PALETTE_BGR[(k * 3) % 8]
    return img


def _static_clip_is_exact(path: Path, num_frames: int) -> tuple[bool, np.ndarray]:
    decoded = read_video_frames(path, rgb=False)
    exact = len(decoded) == num_frames and all(np.array_equal(f, decoded[0]) for f in decoded)
    return exact, decoded[0]


def _write_static(path: Path, candidates: Sequence[np.ndarray], num_frames: int, fps: float,
                  rounds: int = 4) -> None:
    """Write one image ``num_frames`` times so that the clip *decodes* to identical frames.

    mp4v codes the first frame as a key frame and the next ones as P-frames whose
    reconstruction can differ slightly from the key frame's (OpenCV's writer exposes no GOP
    setting). Re-encoding the decoded key frame usually reaches, within a round or two, an
    image the codec reproduces exactly in both frame types; some textures oscillate instead,
    so the next candidate image (e.g. a smoothed one) is tried. The result is checked by
    decoding; if nothing converges the last, near-identical clip is left in place."""
    for img in candidates:
        for _ in range(rounds):
            _write_frames(path, [img] * num_frames, fps)
            if num_frames == 1:
                return
            exact, img = _static_clip_is_exact(path, num_frames)
            if exact:
                return


def write_scene_video(path: str | os.PathLike, num_frames: int = 48, width: int = 224,
                      height: int = 224, fps: float = 8.0, num_scenes: int = 3,
                      scene_lengths: Sequence[int] | None = None, objects_per_scene: int = 2,
                      seed: int = 0) -> SyntheticVideo:
    """Write a multi-scene clip and return it with its planted scene boundaries.

    Scenes split ``num_frames`` evenly unless ``scene_lengths`` is given. Each scene has its
    own static background (palette colour + texture) and ``objects_per_scene`` shapes moving
    (bouncing) inside it; between cuts only the shapes change, so frame differences jump
    exactly at ``SyntheticVideo.boundaries``.
    """
    _check_size(width, height)
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    rng = np.random.default_rng(seed)
    scenes = _split_scenes(num_frames, num_scenes, scene_lengths)
    colors = rng.permutation(len(_PALETTE_BGR))
    textures = rng.permutation(len(_TEXTURES))
    frames = []
    for i, (start, end) in enumerate(scenes):
        color = _PALETTE_BGR[int(colors[i % len(colors)])]
        texture = _TEXTURES[int(textures[i % len(textures)])]
        bg = _background(texture, color, width, height, rng)
        movers = _movers(rng, objects_per_scene, width, height, color)
        for _ in range(start, end):
            img = bg.copy()
            for m in movers:
                m.draw(img)
                m.step(width, height)
            frames.append(img)
    _write_frames(Path(path), frames, fps)
    return SyntheticVideo(Path(path), num_frames, width, height, float(fps),
                          boundaries=[s for s, _ in scenes[1:]], scenes=scenes)


def write_static_video(path: str | os.PathLike, num_frames: int = 16, width: int = 224,
                       height: int = 224, fps: float = 8.0, seed: int = 0) -> SyntheticVideo:
    """Write a clip whose frames are all identical (textured background + fixed shapes).

    The *decoded* frames are bit-identical too (see ``_write_static``)."""
    cv2 = _cv2()
    _check_size(width, height)
    rng = np.random.default_rng(seed)
    color = _PALETTE_BGR[int(rng.integers(0, len(_PALETTE_BGR)))]
    img = _background(_TEXTURES[int(rng.integers(0, len(_TEXTURES)))], color, width, height, rng)
    for m in _movers(rng, 2, width, height, color):
        m.draw(img)
    candidates = [img, cv2.GaussianBlur(img, (5, 5), 0), _blocky_image(color, width, height, rng)]
    _write_static(Path(path), candidates, num_frames, fps)
    return SyntheticVideo(Path(path), num_frames, width, height, float(fps),
                          boundaries=[], scenes=[(0, num_frames)])


def write_single_frame_video(path: str | os.PathLike, width: int = 224, height: int = 224,
                             fps: float = 8.0, seed: int = 0) -> SyntheticVideo:
    """Write a one-frame clip.

    For the algorithm's edge cases, not for vLLM: vllm 0.32's OpenCV loader decodes 0 frames
    from a one-frame mp4v clip (its end-of-stream seek check leaves the capture unreadable)
    and its Qwen2-VL loader divides by zero (frame count floored to a multiple of 2)."""
    return write_static_video(path, num_frames=1, width=width, height=height, fps=fps, seed=seed)


def video_data_url(path: str | os.PathLike, mime: str = "video/mp4") -> str:
    """``data:video/mp4;base64,...`` for a file (what a ``video_url`` content part accepts)."""
    data = Path(path).read_bytes()
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def read_video_frames(path: str | os.PathLike, rgb: bool = True) -> np.ndarray:
    """Decode every frame of a clip with OpenCV: ``uint8`` array of shape (T, H, W, 3)."""
    cv2 = _cv2()
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise RuntimeError(f"OpenCV cannot open {path}")
    frames = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if rgb else frame)
    finally:
        cap.release()
    if not frames:
        raise RuntimeError(f"no frames decoded from {path}")
    return np.stack(frames)


def frame_difference(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between consecutive frames, shape (T-1,); entry i is the
    change from frame i to frame i+1 (a cut at frame b shows up at index b-1)."""
    f = frames.astype(np.float32)
    return np.abs(f[1:] - f[:-1]).mean(axis=tuple(range(1, f.ndim)))


def detect_cuts(frames: np.ndarray, threshold: float | None = None) -> list[int]:
    """Frame indices where a new scene starts, by thresholding :func:`frame_difference`.

    Default threshold: ``max(8, 4 x median difference)``; on the synthetic clips moving
    shapes change a frame by a few grey levels on average and a cut by tens."""
    d = frame_difference(frames)
    if d.size == 0:
        return []
    if threshold is None:
        threshold = max(8.0, 4.0 * float(np.median(d)))
    return [int(i) + 1 for i in np.nonzero(d > threshold)[0]]
