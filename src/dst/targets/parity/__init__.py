"""The parity targets (RAID5 and RAID6) as a package of small parts; see :mod:`.device`."""

from dst.targets.parity.device import ParityDevice

__all__ = ["ParityDevice"]
