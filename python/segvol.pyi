"""SegVol 3-D CT segmentation from text, box and point prompts, on segvol's Rust engine.

Arrays are NIfTI voxel order ``(i, j, k)`` (as nibabel gives them); masks come back as
``uint8`` arrays of the same shape (Fortran-ordered, 0/1). Coordinates of boxes and points are
voxel indices ``(i, j, k)``, or world millimetres with ``mm=True``; a box is
``[i0, j0, k0, i1, j1, k1]`` with both corners inclusive, min corner first.

Errors carry the CLI's one-line messages: ``ValueError`` for bad input (prompts, volumes,
options, files that are not what they claim), ``OSError``/``FileNotFoundError`` for files that
cannot be read, :class:`EngineError` when the engine or the device fails. Compute runs with the
GIL released.
"""

import os
from typing import Any, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str
DEFAULT_CANDIDATES: list[str]

#: A volume: a 3-D array (i, j, k), a nibabel image, or a path to a NIfTI file.
VolumeLike = Union[npt.ArrayLike, "os.PathLike[str]", str, Any]
#: Coordinates: a sequence of numbers, or the CLI's "a,b,c" text.
Coords = Union[Sequence[float], str]
#: One point, or a sequence of points.
Points = Union[Coords, Sequence[Coords]]
#: A byte count, or a size such as "40G".
Size = Union[int, str]

class EngineError(RuntimeError):
    """The engine or the device failed (a kernel launch, device memory, an internal invariant)."""

class Engine:
    """A model loaded once on a device; opens sessions on volumes.

    ``device`` is ``"cpu"``, ``"emu"`` or ``"cuda[:N]"``; ``precision`` ``"f32"``, ``"bf16"`` or
    ``"f16"`` (default: f32 on cpu, bf16 elsewhere); ``mem_limit`` the device memory budget;
    ``batch`` the sliding windows per model call. One engine may serve several threads: their
    sessions take turns per model step.
    """

    def __init__(
        self,
        model_dir: Union[str, "os.PathLike[str]"],
        device: str = "cpu",
        precision: str | None = None,
        mem_limit: Size | None = None,
        batch: int = 1,
    ) -> None: ...
    @property
    def device(self) -> str:
        """The device and storage precision, e.g. ``"cpu (f32)"``."""
    def open(
        self,
        volume: VolumeLike,
        affine: npt.ArrayLike | None = None,
        spacing: Sequence[float] | None = None,
        cache: Size | None = None,
    ) -> "Session":
        """Opens a volume: preprocessing, crop and the zoom-out embedding run once.

        An array takes its geometry from ``affine`` (4x4 voxel-to-world, RAS mm) or ``spacing``
        (mm per voxel along i, j, k; default 1 mm); a nibabel image or a file brings its own.
        ``cache`` bounds the zoom-in embeddings kept for later prompts (default 1 GiB).
        """

class Session:
    """One volume opened on an engine, prompted again and again."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """The volume's shape (i, j, k)."""
    @property
    def cache_bytes(self) -> int:
        """Bytes of zoom-in embeddings held now."""
    def segment(
        self,
        text: str | None = None,
        box: Coords | None = None,
        points: Points | None = None,
        negative_points: Points | None = None,
        mm: bool = False,
        keep_roi: bool = False,
    ) -> tuple[npt.NDArray[np.uint8], dict[str, Any]]:
        """Segments one prompt: the mask on the volume's grid and a report (voxels, ml, roi,
        windows, cached_windows, roi_kept, seconds). ``keep_roi`` refines inside the previous
        prompt's ROI (a documented departure from the official pipeline)."""
    def identify(
        self,
        box: Coords | None = None,
        points: Points | None = None,
        negative_points: Points | None = None,
        mm: bool = False,
        candidates: Sequence[str] | None = None,
    ) -> list[tuple[str, float, float]]:
        """Names what a spatial prompt segments: ``(name, score, share)`` best first
        (default candidates: :data:`DEFAULT_CANDIDATES`)."""

def segment(
    volume: VolumeLike,
    model_dir: Union[str, "os.PathLike[str]"],
    text: str | None = None,
    box: Coords | None = None,
    points: Points | None = None,
    negative_points: Points | None = None,
    mm: bool = False,
    device: str = "cpu",
    precision: str | None = None,
    mem_limit: Size | None = None,
    batch: int = 1,
    affine: npt.ArrayLike | None = None,
    spacing: Sequence[float] | None = None,
) -> tuple[npt.NDArray[np.uint8], dict[str, Any]]:
    """One shot: loads the model and segments one prompt on one volume, exactly as
    ``segvol segment`` does; returns the mask and the report."""
