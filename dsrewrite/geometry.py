"""ConvGeometry: where a convolution's kernel lands on its input (pure; no ONNX here).

One type for what every part of dsrewrite needs to know about a conv's
placement: the kernel shape, strides, pads, dilations and ``auto_pad``. The
cost model asks it for output sizes, patch extraction for explicit pads, and
``graph.ConvSpec`` carries one for the node it describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ConvGeometry:
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends, as in ONNX; ignored unless auto_pad is NOTSET
    dilations: tuple[int, ...]
    auto_pad: str = "NOTSET"

    @property
    def dims(self) -> int:
        return len(self.kernel_shape)

    def span(self, axis: int) -> int:
        """Input extent one output position reads along ``axis``."""
        return self.dilations[axis] * (self.kernel_shape[axis] - 1) + 1

    def explicit_pads(self, spatial: Sequence[int]) -> list[int]:
        """Begin/end pads after resolving ``auto_pad`` for these input dims."""
        d = self.dims
        if self.auto_pad == "VALID":
            return [0] * (2 * d)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begins, ends = [], []
            for i in range(d):
                out = -(-spatial[i] // self.strides[i])
                total = max(0, (out - 1) * self.strides[i] + self.span(i) - spatial[i])
                small, big = total // 2, total - total // 2
                begin, end = (small, big) if self.auto_pad == "SAME_UPPER" else (big, small)
                begins.append(begin)
                ends.append(end)
            return begins + ends
        return list(self.pads) if self.pads else [0] * (2 * d)

    def output_spatial(self, spatial: Sequence[int | None]) -> list[int | None]:
        """Spatial output dims for these input dims; None where an input dim is unknown."""
        d = self.dims
        same = self.auto_pad in ("SAME_UPPER", "SAME_LOWER")
        pads = None if same else self.explicit_pads(spatial)
        out: list[int | None] = []
        for i in range(d):
            size = spatial[i]
            if size is None:
                out.append(None)
            elif same:
                out.append(-(-size // self.strides[i]))
            else:
                out.append((size + pads[i] + pads[i + d] - self.span(i)) // self.strides[i] + 1)
        return out


def output_elements(batch: int | None, output_spatial: Sequence[int | None]) -> int | None:
    """Output pixels over the batch, or None if any dim is unknown."""
    if batch is None or any(s is None for s in output_spatial):
        return None
    return batch * math.prod(output_spatial)
