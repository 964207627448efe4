"""The mirror target (RAID 1) as a package of small parts; see :mod:`.device`."""

from dst.targets.mirror.device import MirrorDevice
from dst.targets.mirror.dirtylog import ReaddPlan
from dst.targets.mirror.legs import Leg, LegState

__all__ = ["Leg", "LegState", "MirrorDevice", "ReaddPlan"]
