"""Split the decoder layers into pipeline stages: StageSpec(rank, [start, end), embed?, head?)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    rank: int
    num_stages: int
    start: int  # first layer owned (inclusive)
    end: int  # last layer owned (exclusive)
    has_embed: bool
    has_head: bool

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    @property
    def is_last(self) -> bool:
        return self.rank == self.num_stages - 1


def parse_layout(text: str) -> list[int]:
    """'25,23' -> [25, 23]: layers per stage, as given on the command line."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected comma-separated layer counts such as '25,23'") from None
    return counts


def partition(num_layers: int, num_stages: int, layer_counts: list[int] | None = None) -> list[StageSpec]:
    """Even split by default (earlier stages take the remainder); or explicit layers per stage."""
    if num_stages < 1:
        raise ValueError(f"stages must be >= 1, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(f"stages={num_stages} exceeds the model's {num_layers} layers: each stage needs a layer")
    if layer_counts is None:
        base, extra = divmod(num_layers, num_stages)
        layer_counts = [base + (1 if r < extra else 0) for r in range(num_stages)]
    if len(layer_counts) != num_stages or sum(layer_counts) != num_layers or min(layer_counts) < 1:
        raise ValueError(f"layer split {layer_counts} must have {num_stages} positive counts summing to "
                         f"{num_layers} layers")
    specs, start = [], 0
    for r, n in enumerate(layer_counts):
        specs.append(StageSpec(r, num_stages, start, start + n, r == 0, r == num_stages - 1))
        start += n
    return specs
