"""The offloaded target: decoder layers kept packed in host RAM and streamed to the compute device."""

from .model import Offloaded, Placement, offload_model, plan_placement
from .store import PackedLayer, pack_layer

__all__ = ["Offloaded", "PackedLayer", "Placement", "offload_model", "pack_layer", "plan_placement"]
