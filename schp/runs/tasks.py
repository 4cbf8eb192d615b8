"""The extractor's tasks: an image or a video and the outputs it should produce (no heavy imports, so
that planning and the dry run answer before torch is loaded)."""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from schp.runs.loop import Task

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def is_video_name(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


@dataclass
class ImageTask(Task):
    """One input image and the outputs it should produce (None = not asked for)."""
    source: Path
    name: str  # how messages name the input (relative to the input root)
    png: Optional[Path] = None  # palette label map
    codes: Optional[Path] = None  # IntegratedPIFu float32 code map
    logits: Optional[Path] = None  # H x W x C float32 logits
    overlay: Optional[Path] = None  # colour map over the image, JPEG
    refusal: Optional[str] = None  # known before the run not to be doable (e.g. an output name clash)

    @property
    def outputs(self) -> List[Path]:
        return [p for p in (self.png, self.codes, self.logits, self.overlay) if p is not None]


@dataclass
class VideoTask(Task):
    """One video file and its outputs."""
    source: Path
    name: str
    frames: Path  # folder of frame_NNNNNN.png maps (and .npy logits)
    parsing: Path  # colour-map video
    overlay: Optional[Path] = None  # colour maps over the frames
    logits: bool = False
    every: int = 1
    refusal: Optional[str] = None

    @property
    def outputs(self) -> List[Path]:
        return [p for p in (self.frames, self.parsing, self.overlay) if p is not None]

    def frame_paths(self, index: int) -> Tuple[Path, Optional[Path]]:
        png = self.frames / f"frame_{index:06d}.png"
        return png, png.with_suffix(".npy") if self.logits else None

    def frame_done(self, index: int) -> bool:
        return all(p is None or p.exists() for p in self.frame_paths(index))

    def is_done(self) -> bool:
        if not (self.parsing.exists() and (self.overlay is None or self.overlay.exists())):
            return False
        if self.logits:  # logits asked after a run without them: the frames still need their logits
            names = set(os.listdir(self.frames)) if self.frames.is_dir() else set()
            return all(n[:-4] + ".npy" in names for n in names if n.startswith("frame_") and n.endswith(".png"))
        return True


def video_task(input_dir: Path, output_dir: Path, rel: Path, logits: bool, overlay: bool,
               every: int) -> VideoTask:
    """The outputs of video `rel` (relative to the input folder) under `output_dir`."""
    stem = output_dir / rel.with_suffix("")
    return VideoTask(source=input_dir / rel, name=str(rel), frames=stem,
                     parsing=stem.with_name(stem.name + "_parsing.mp4"),
                     overlay=stem.with_name(stem.name + "_overlay.mp4") if overlay else None,
                     logits=logits, every=every)
