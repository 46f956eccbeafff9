"""The PatchCore memory bank shared by BTF and M3DM: greedy coreset, exact kNN, reweighted image score."""

from mmiad.methods.memorybank.bank import MemoryBank, PatchStore, reweighted_score
from mmiad.methods.memorybank.coreset import greedy_coreset, jl_min_dim, sparse_projection
from mmiad.methods.memorybank.knn import NearestNeighbors, faiss_available

__all__ = [
    "MemoryBank",
    "NearestNeighbors",
    "PatchStore",
    "faiss_available",
    "greedy_coreset",
    "jl_min_dim",
    "reweighted_score",
    "sparse_projection",
]
