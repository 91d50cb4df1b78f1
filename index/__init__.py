"""FAISS index code for faceserve, importable without Ray."""
from .adaptive import AdaptiveIndex
from .collection_index import SNAPSHOT_FORMAT_VERSION, CollectionIndex
from .policy import BuildReport, IndexPolicy, array_source, build_index
from .sharding import ShardedIndex

__all__ = [
    "AdaptiveIndex",
    "BuildReport",
    "CollectionIndex",
    "IndexPolicy",
    "ShardedIndex",
    "SNAPSHOT_FORMAT_VERSION",
    "array_source",
    "build_index",
]
