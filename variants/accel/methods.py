"""The built-in accelerations, registered in `ACCELERATIONS` on first look-up (variants/accel/__init__.py)."""

from __future__ import annotations

from typing import Any, ClassVar

from . import ACCELERATIONS
from .base import Acceleration
from .fastvar import fastvar
from .lantern import lantern
from .litevar import litevar
from .skipvar import skipvar
from .sjd import sjd
from .stagevar import stagevar
from .zipar import zipar

__all__ = ["NoAcceleration", "none"]


class NoAcceleration(Acceleration):
    name = "none"
    defaults: ClassVar[dict[str, Any]] = {}


def none(**kwargs: Any) -> NoAcceleration:
    """No acceleration: plain VAR, the baseline row of an accelerations study."""
    return NoAcceleration(**kwargs)


for _factory in (none, fastvar, skipvar, stagevar, litevar, sjd, lantern, zipar):
    ACCELERATIONS.add(_factory.__name__, _factory)
