"""The one shared draft -> verify -> accept -> commit engine."""

from .adapter import AccelStats, KVMethod, Row, SpeculativeAdapter
from .loop import run
from .tree import Tree

__all__ = ["AccelStats", "KVMethod", "Row", "SpeculativeAdapter", "Tree", "run"]
