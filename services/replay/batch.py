"""A batch of trade frames on their way out: what the publisher hands to the stream hub.

Its own module because three others share it and none of them owns it: the fault state builds batches
(:mod:`services.replay.faults`), the publisher makes and broadcasts them (:mod:`services.replay.publisher`) and
every connection queues them (:mod:`services.replay.streams`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Batch:
    """Trade frames on their way out, in order: ``payloads[i]`` belongs to symbol index ``symbols[i]``."""

    symbols: Sequence[int]
    payloads: list[str]

    def __len__(self) -> int:
        return len(self.payloads)
