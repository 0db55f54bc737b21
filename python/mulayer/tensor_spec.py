"""Name, shape and dtype of a model input or output (shared by compiler and runtime)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, raw: dict) -> TensorSpec:
        return cls(str(raw["name"]), tuple(int(d) for d in raw["shape"]), str(raw["dtype"]))
