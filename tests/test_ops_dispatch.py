"""ops.dispatch and the per-platform choice of ops.attention; the kernels lower for GPU and TPU.

Interpret mode checks the kernels' math but none of the backends' rules (Triton's power-of-two
tiles, Mosaic TPU's (8, 128) blocks). Exporting for a platform runs the real lowering on this CPU,
so those rules are checked here without a device."""
import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax._src.cudnn import fused_attention_stablehlo  # its version check, stubbed: no GPU here

import ops
from ops import dispatch
from ops import attention as attention_fn
from ops.attention import attention_pallas


def _qkv(shape, dtype=jnp.float32):
  return [jax.random.normal(jax.random.key(i), shape).astype(dtype) for i in range(3)]


def test_none_on_cpu_is_the_reference_never_interpret_mode():
  q, k, v = _qkv((1, 16, 2, 8))
  jaxpr = str(jax.make_jaxpr(lambda *a: attention_fn(*a))(q, k, v))
  assert "pallas_call" not in jaxpr
  jaxpr = str(jax.make_jaxpr(lambda *a: attention_fn(*a, implementation="pallas"))(q, k, v))
  assert "pallas_call" in jaxpr


@pytest.mark.parametrize("case,want", [
    (dict(dtype=jnp.bfloat16), "cudnn"),
    (dict(dtype=jnp.float32), "pallas"),                          # cuDNN: no f32
    (dict(dtype=jnp.bfloat16, length=49, bias=True), "pallas"),   # cuDNN: odd length with a bias
    (dict(dtype=jnp.bfloat16, length=49), "pallas"),              # cuDNN: odd length, no bias
    (dict(dtype=jnp.bfloat16, segments=True), "pallas"),          # cuDNN: no segment ids
    (dict(dtype=jnp.float32, head_dim=48), "xla"),                # Triton: power-of-two head dims
    (dict(dtype=jnp.bfloat16, capability=(7, 0)), "pallas"),      # cuDNN: Ampere or later
    (dict(dtype=jnp.bfloat16, head_dim=256, capability=(8, 0)), "pallas"),  # <= 128 before Hopper
    (dict(dtype=jnp.bfloat16, head_dim=256, capability=(9, 0)), "cudnn"),
])
def test_gpu_preference_falls_through_to_what_serves(monkeypatch, case, want):
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setattr(dispatch, "compute_capability", lambda: case.get("capability", (9, 0)))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  length, d = case.get("length", 64), case.get("head_dim", 64)
  q, k, v = _qkv((2, length, 2, d), case["dtype"])
  bias = jnp.zeros((2, length, length)) if case.get("bias") else None
  seg = jnp.zeros((2, length), jnp.int32) if case.get("segments") else None
  chosen = []
  monkeypatch.setattr(dispatch, "choose", _recording(dispatch.choose, chosen))
  with pytest.raises(_Stop):
    attention_fn(q, k, v, bias=bias, segment_ids=seg)
  assert chosen == [want]


class _Stop(Exception):
  pass


def _recording(choose, chosen):
  def wrapped(*args, **kwargs):
    chosen.append(choose(*args, **kwargs))
    raise _Stop  # stop before running a GPU path on this CPU
  return wrapped


def test_choose_names_the_reason():
  reasons = {"xla": lambda: None, "fast": lambda: "needs a unicorn"}
  pref = {dispatch.platform(): ("fast", "xla")}
  assert dispatch.choose("op", None, reasons, pref) == "xla"
  with pytest.raises(ValueError, match=r"op: implementation='fast' cannot serve this call: needs a unicorn"):
    dispatch.choose("op", "fast", reasons, pref)
  with pytest.raises(ValueError, match=r"op: expected implementation in \(None, 'xla', 'fast'\), got 'slow'"):
    dispatch.choose("op", "slow", reasons, pref)


# Forward and backward (dq, dk, dv, dbias) of each kernel configuration, with the kernel count.
LOWERING_CASES = {
    "plain": dict(shape=(2, 256, 4, 64), kernels=3),
    "causal_segments_ragged": dict(shape=(2, 197, 4, 64), causal=True, segments=True, kernels=3),
    # dbias from the dQ kernel
    "bias_per_batch_ragged": dict(shape=(2, 144, 4, 32), bias=(2, 4, 144, 144), kernels=3),
    # dbias summed over the windows by its own kernel
    "windows_shared_bias": dict(shape=(8, 49, 4, 32), bias=(1, 4, 49, 49), kernels=4),
}


@pytest.mark.parametrize("platform,target", [("cuda", "gpu"), ("tpu", "tpu")])
@pytest.mark.parametrize("name", list(LOWERING_CASES))
def test_kernels_lower_for_device(platform, target, name):
  case = LOWERING_CASES[name]
  q = jnp.zeros(case["shape"], jnp.bfloat16)
  bias = jnp.zeros(case["bias"], jnp.float32) if "bias" in case else None
  seg = jnp.zeros(case["shape"][:2], jnp.int32) if case.get("segments") else None
  def loss(q, k, v, bias):
    out = attention_pallas(q, k, v, bias=bias, segment_ids=seg, causal=case.get("causal", False),
                           target=target)
    return jnp.sum(out.astype(jnp.float32))
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  exported = export.export(
      jax.jit(jax.grad(loss, argnums)), platforms=[platform],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(q, q, q, bias)
  text = exported.mlir_module()
  kernels = text.count("xla.gpu.triton") if platform == "cuda" else text.count("tpu_custom_call")
  assert kernels == case["kernels"]  # forward, dK/dV, dQ (+ dbias)


@pytest.mark.parametrize("length, want", [(49, "xla.gpu.triton"), (50, "__cudnn$fmhaSoftmaxBackward")])
def test_bf16_attention_trains_on_gpu_at_odd_and_even_lengths(monkeypatch, length, want):
  # BiFormer-T's stage 4 attends over 7 x 7 = 49 tokens. jax's cuDNN gradient refuses odd lengths
  # even without a bias ("Unsupported sequence length Q 49, KV 49"); they go to the Pallas kernel.
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)  # cuDNN 9.10
  q = jnp.zeros((2, length, 4, 32), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(attention_fn(q, k, v).astype(jnp.float32))
  exported = export.export(jax.jit(jax.grad(loss, (0, 1, 2))), platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call(name)
      for name in ("__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")])(
          q, q, q)
  assert want in exported.mlir_module()


def test_kernel_refusals_skip_on_devices_and_fail_on_cpu(monkeypatch):
  # tests/conftest.py turns this error into a skip on a GPU or TPU: the CPU tests that name
  # "pallas" for shapes the interpreter runs and Triton cannot tile (a value head dim of 24 here).
  from conftest import device_refusal
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  q = jnp.zeros((1, 64, 2, 16))
  v = jnp.zeros((1, 64, 2, 24))
  with pytest.raises(ValueError) as refused:
    ops.lightning_attention(q, q, v, implementation="pallas")
  assert device_refusal(refused.value, "gpu") == (
      "the gpu kernel refuses this case: Triton tiles need a power-of-two v head_dim >= 16, got 24")
  assert device_refusal(refused.value, "cpu") is None
  assert device_refusal(ValueError("attention: expected q of rank 4"), "gpu") is None
