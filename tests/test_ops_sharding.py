"""ops.sharding: logical names -> PartitionSpecs through the rules table (no devices needed: the
specs resolve on an abstract mesh)."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from configs import itransformer
from ops import sharding

AXES = ("data", "fsdp", "tensor")
MESH_222 = AbstractMesh((2, 2, 2), AXES)
FSDP_8 = AbstractMesh((1, 8, 1), AXES)


@pytest.mark.parametrize("names, shape, mesh, want", [
    (("embed", "mlp"), (64, 256), MESH_222, P("fsdp", "tensor")),
    (("mlp", "embed"), (256, 64), MESH_222, P("tensor", "fsdp")),
    (("embed", "mlp"), (64, 85), MESH_222, P("fsdp")),          # 85 hidden units: not split
    (("embed", "mlp"), (64, 256), FSDP_8, P("fsdp")),          # size-1 axes are left out
    ((None, None, "conv_in", "conv_out"), (3, 3, 3, 64), FSDP_8, P(None, None, None, "fsdp")),
    (("batch", None, "embed"), (16, 7, 64), MESH_222, P(("data", "fsdp"))),  # fsdp taken by batch
    (("batch", None, "mlp"), (16, 7, 64), MESH_222, P(("data", "fsdp"), None, "tensor")),
    (("batch",), (2,), MESH_222, P("data")),                   # fsdp does not divide what is left
    (("norm",), (64,), MESH_222, P()),
])
def test_spec_resolves_names_through_the_rules(names, shape, mesh, want):
  assert sharding.spec(names, shape, mesh) == want


def test_use_rules_overrides_entries_and_refuses_unknown_names():
  with sharding.use_rules({"mlp": ("fsdp",), "embed": ()}):
    assert sharding.spec(("embed", "mlp"), (64, 256), MESH_222) == P(None, "fsdp")
  assert sharding.spec(("embed", "mlp"), (64, 256), MESH_222) == P("fsdp", "tensor")
  with pytest.raises(ValueError, match="unknown logical axes \\['hiden'\\]"):
    with sharding.use_rules({"hiden": ("tensor",)}):
      pass
  with sharding.use_rules({"mlp": ("model",)}):
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
      sharding.spec(("mlp",), (64,), MESH_222)
  with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
    sharding.axes("embed", "hidden")
  with pytest.raises(ValueError, match="do not match an array of shape"):
    sharding.spec(("embed",), (4, 4), MESH_222)


def test_config_rules_are_the_table_and_take_command_line_tuples():
  from ml_collections.config_flags import tuple_parser
  config = itransformer.get_config("digits")
  assert config.mesh.rules.to_dict() == sharding.RULES
  config.mesh.rules.mlp = tuple_parser.TupleParser().parse("fsdp")  # --config.mesh.rules.mlp=fsdp
  with sharding.use_rules(config.mesh.rules):
    assert sharding.rules()["mlp"] == ("fsdp",)


def test_without_a_mesh_everything_is_whole():
  x = jnp.ones((4, 8))
  assert sharding.spec(("batch", "mlp"), x.shape) == P()
  assert sharding.constrain(x, ("batch", "mlp")) is x
  calls = []
  run = sharding.shard_map(lambda a: calls.append(a.shape) or a * 2, [("batch", None)],
                           ("batch", None))
  assert (run(x) == 2).all() and calls == [(4, 8)]


def test_tree_specs_follow_each_variables_names():
  from flax import nnx
  from models import layers
  model = nnx.eval_shape(lambda: layers.Mlp(64, 256, rngs=nnx.Rngs(0)))
  with jax.sharding.use_abstract_mesh(MESH_222):
    specs = sharding.tree_specs(nnx.state(model))
  assert specs["fc1"]["kernel"] == P("fsdp", "tensor")
  assert specs["fc2"]["kernel"] == P("tensor", "fsdp")
  assert specs["fc1"]["bias"] == P("tensor") and specs["fc2"]["bias"] == P("fsdp")
