"""FAISS index code for faceserve, importable without Ray."""
from .collection_index import SNAPSHOT_FORMAT_VERSION, CollectionIndex
from .sharding import ShardedIndex

__all__ = ["CollectionIndex", "ShardedIndex", "SNAPSHOT_FORMAT_VERSION"]
