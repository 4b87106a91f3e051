"""Ops: attention kernels with jnp references (see DESIGN.md, "Ops API")."""
from ops.attention import attention, attention_pallas, attention_reference
from ops.window_attention import relative_position_bias, relative_position_index, window_attention

__all__ = ["attention", "attention_pallas", "attention_reference", "relative_position_bias",
           "relative_position_index", "window_attention"]
