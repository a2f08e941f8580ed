"""Drafters: whatever proposes the tree of likely continuations that the target verifies."""

from .base import Drafter
from .model import ModelDrafter
from .ngram import NgramDrafter

__all__ = ["Drafter", "ModelDrafter", "NgramDrafter"]
