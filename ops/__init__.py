"""Ops: attention kernels with jnp references (see DESIGN.md, "Ops API"), the depthwise conv, and
what the zoo does because of XLA:CPU (`ops.xla_cpu`)."""
from ops.attention import attention, attention_pallas, attention_reference
from ops.depthwise_conv import depthwise_conv2d
from ops.linear_attention import (diag_attention, lightning_attention,
                                  lightning_attention_reference, lightning_decode_step,
                                  lightning_prefill, norm_attention, simple_rms_norm)
from ops.routing import (region_routes, routing_attention, routing_attention_pallas,
                         routing_attention_reference)
from ops.window_attention import (relative_position_bias, relative_position_index,
                                  window_attention, window_attention_pallas)
from ops.xla_cpu import random_bits

__all__ = ["attention", "attention_pallas", "attention_reference", "depthwise_conv2d",
           "random_bits", "relative_position_bias", "relative_position_index", "window_attention", "window_attention_pallas",
           "diag_attention", "lightning_attention", "lightning_attention_reference",
           "lightning_decode_step", "lightning_prefill", "norm_attention", "simple_rms_norm",
           "region_routes", "routing_attention", "routing_attention_pallas",
           "routing_attention_reference"]
