"""BTF (Back to the Feature): RGB + FPFH PatchCore."""

from mmiad.methods.btf.model import BTF, BTFConfig, btf_patches

__all__ = ["BTF", "BTFConfig", "btf_patches"]
