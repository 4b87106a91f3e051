"""Ops: attention kernels with jnp references (see DESIGN.md, "Ops API")."""
from ops.attention import attention, attention_pallas, attention_reference
from ops.linear_attention import (diag_attention, lightning_attention,
                                  lightning_attention_reference, lightning_decode_step,
                                  lightning_prefill, norm_attention, simple_rms_norm)
from ops.routing import (region_routes, routing_attention, routing_attention_pallas,
                         routing_attention_reference)
from ops.window_attention import (relative_position_bias, relative_position_index,
                                  window_attention, window_attention_pallas)

__all__ = ["attention", "attention_pallas", "attention_reference", "relative_position_bias",
           "relative_position_index", "window_attention", "window_attention_pallas",
           "diag_attention", "lightning_attention", "lightning_attention_reference",
           "lightning_decode_step", "lightning_prefill", "norm_attention", "simple_rms_norm",
           "region_routes", "routing_attention", "routing_attention_pallas",
           "routing_attention_reference"]
