"""Ops: attention kernels with jnp references (see DESIGN.md, "Ops API")."""
from ops.attention import attention, attention_pallas, attention_reference

__all__ = ["attention", "attention_pallas", "attention_reference"]
