"""Which layers a decode step checks for an exit: SpecEE's offline set plus an online set."""
from collections import deque
from typing import Iterable, List, Sequence


class ExitSchedule:
    """offline ∪ {e + o for o in online_offsets, e in the last `history` exit layers}.

    The online part starts once `history` exits are recorded (SpecEE: 5 exits, offsets
    -2, 0, +2). Layers are restricted to [0, n_layer - 2]: exiting after the last layer saves
    nothing.
    """

    def __init__(self, n_layer: int, offline: Iterable[int], online_offsets: Sequence[int] = (-2, 0, 2),
                 history: int = 5):
        self.n_layer = n_layer
        self.offline = sorted(set(int(il) for il in offline))
        self.online_offsets = list(online_offsets)
        self.recent_exits = deque(maxlen=history)

    def layers(self) -> List[int]:
        chosen = set(self.offline)
        if len(self.recent_exits) == self.recent_exits.maxlen:
            chosen.update(e + o for e in self.recent_exits for o in self.online_offsets)
        return sorted(il for il in chosen if 0 <= il <= self.n_layer - 2)

    def record_exit(self, layer: int) -> None:
        self.recent_exits.append(layer)

    def reset(self) -> None:
        self.recent_exits.clear()
