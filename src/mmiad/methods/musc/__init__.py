"""MuSc-V2: zero-shot mutual scoring of an unlabeled batch (IPG, SNAMD, MSM, CAE, RsCon); see README.md."""

from mmiad.methods.musc.config import MuScConfig
from mmiad.methods.musc.model import MuSc
from mmiad.methods.musc.msm import BatchTooSmallError, MixedSizeError, minimum_batch

__all__ = ["BatchTooSmallError", "MixedSizeError", "MuSc", "MuScConfig", "minimum_batch"]
