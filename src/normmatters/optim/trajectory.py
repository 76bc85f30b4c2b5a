"""Per-channel weight norms over training, saved in a portable format (``.npz`` arrays, no pickle)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..atomic_write import atomic_write

__all__ = ["NormTrajectory", "channel_norms"]


def channel_norms(w: Tensor) -> Tensor:
    """‖w_c‖₂ over all dims but 0 (one value per output channel; a 1-D tensor gives |w_c|)."""
    w = w.detach()
    return w.abs() if w.dim() <= 1 else torch.linalg.vector_norm(w.flatten(1), dim=1)


class NormTrajectory:
    """A list over steps of the per-channel norms of a fixed list of parameters.

    ``append(params)`` records one step; ``norms(step)`` returns that step's list of (C_i,) float64 tensors.
    ``save(path)`` writes an ``.npz`` file (one (steps, C_i) array per parameter plus a JSON header) atomically;
    ``NormTrajectory.load(path)`` reads it without unpickling anything.
    """

    FORMAT = "normmatters.NormTrajectory/1"

    def __init__(self) -> None:
        self._shapes: list[tuple[int, ...]] | None = None
        self._steps: list[list[np.ndarray]] = []

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def shapes(self) -> list[tuple[int, ...]] | None:
        """The shapes of the parameters this trajectory was recorded for (None while empty)."""
        return self._shapes

    def check_params(self, params: list[Tensor], where: str = "NormTrajectory") -> None:
        """Raise a clear ``ValueError`` unless ``params`` match the recorded count and shapes."""
        shapes = [tuple(p.shape) for p in params]
        if self._shapes is not None and shapes != self._shapes:
            if len(shapes) != len(self._shapes):
                raise ValueError(f"{where}: the trajectory has {len(self._shapes)} parameters, got {len(shapes)}")
            i = next(i for i, (a, b) in enumerate(zip(shapes, self._shapes)) if a != b)
            raise ValueError(f"{where}: parameter {i} has shape {shapes[i]} but the trajectory recorded "
                             f"{self._shapes[i]}")

    def append(self, params: Iterable[Tensor]) -> None:
        params = list(params)
        if not params:
            raise ValueError("NormTrajectory.append: got no parameters")
        if any(p.dim() == 0 for p in params):
            raise ValueError("NormTrajectory.append: parameters must have at least one dim (channels)")
        self.check_params(params, "NormTrajectory.append")
        if self._shapes is None:
            self._shapes = [tuple(p.shape) for p in params]
        self._steps.append([channel_norms(p).to("cpu", torch.float64).numpy().copy() for p in params])

    def norms(self, step: int) -> list[Tensor]:
        if not 0 <= step < len(self._steps):
            raise IndexError(f"NormTrajectory: step {step} requested, but the trajectory holds {len(self)} steps")
        return [torch.from_numpy(a) for a in self._steps[step]]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if self._shapes is None:
            raise ValueError("NormTrajectory.save: nothing recorded yet")
        header = json.dumps({"format": self.FORMAT, "shapes": self._shapes, "steps": len(self)})
        arrays = {f"param{i}": np.stack([s[i] for s in self._steps]) for i in range(len(self._shapes))}
        return atomic_write(path, lambda fh: np.savez(fh, header=np.array(header), **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> NormTrajectory:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"NormTrajectory.load: no file {str(path)!r}")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                if header.get("format") != cls.FORMAT:
                    raise ValueError(f"format {header.get('format')!r}, expected {cls.FORMAT!r}")
                arrays = [data[f"param{i}"] for i in range(len(header["shapes"]))]
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"NormTrajectory.load: {str(path)!r} is not a norm trajectory ({e})") from None
        traj = cls()
        traj._shapes = [tuple(s) for s in header["shapes"]]
        for i, (a, shape) in enumerate(zip(arrays, traj._shapes)):
            want = (header["steps"], shape[0])
            if a.shape != want:
                raise ValueError(f"NormTrajectory.load: {str(path)!r} array param{i} has shape {a.shape}, "
                                 f"expected {want}")
        traj._steps = [[a[t] for a in arrays] for t in range(header["steps"])]
        return traj
