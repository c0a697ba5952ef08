"""The one progress-callback shape every long step reports through."""

from typing import Callable, Optional

# what (a file name, "decode", "epoch 3"), units done so far, units in all when known
Progress = Callable[[str, int, Optional[int]], None]
