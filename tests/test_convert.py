"""Checkpoint conversion (CLI, .pth without torch, .safetensors), key checks, shape inference, load_pretrained."""
import collections
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import load_golden
import models
from models.convert import read_state_dict
from models.convert.__main__ import main as convert_main
from models.itransformer import checkpoint_filter_fn, iTransformer, iTransformerClassifier

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def golden():
  """(official state_dict, arrays) of the iTransformer ETTh1-96 golden fixture."""
  _, state_dict, arrays = load_golden("itransformer", "itransformer_etth1_96")
  return state_dict, arrays


def _forecast(model, arrays):
  return np.asarray(model(jnp.asarray(arrays["x_enc"]), jnp.asarray(arrays["x_mark_enc"])))


def _assert_matches_golden(model, arrays):
  ref = arrays["output"]
  assert np.abs(_forecast(model, arrays) - ref).max() <= 1e-4 * np.abs(ref).max()


def _params(model):
  return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# --- the CLI --------------------------------------------------------------------------------------------------

def test_safetensors_round_trip_through_the_cli(golden, tmp_path):
  from safetensors.numpy import save_file
  state_dict, arrays = golden
  save_file(state_dict, tmp_path / "official.safetensors")
  assert convert_main(["itransformer", str(tmp_path / "official.safetensors"), str(tmp_path / "zoo")]) == 0
  info = json.loads((tmp_path / "zoo" / "model.json").read_text())
  assert info["family"] == "itransformer" and info["class"] == "iTransformer"
  assert {k: info["kwargs"][k] for k in ("seq_len", "pred_len", "d_model", "d_ff", "e_layers")} == dict(
      seq_len=96, pred_len=96, d_model=256, d_ff=256, e_layers=2)
  _assert_matches_golden(models.load_pretrained(models.create_model("itransformer_etth1_96"), tmp_path / "zoo"),
                         arrays)


def test_pth_written_by_torch_round_trip_through_python_m(golden, tmp_path):
  torch = pytest.importorskip("torch")
  state_dict, arrays = golden
  # DataParallel prefixes and a training-script wrapper, as official checkpoints in the wild have them
  wrapped = {"epoch": 3, "state_dict": collections.OrderedDict(
      (f"module.{k}", torch.from_numpy(v)) for k, v in state_dict.items())}
  torch.save(wrapped, tmp_path / "checkpoint.pth")
  result = subprocess.run(
      [sys.executable, "-m", "models.convert", "itransformer", str(tmp_path / "checkpoint.pth"),
       str(tmp_path / "zoo"), "--model", "itransformer_etth1_96"], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert json.loads((tmp_path / "zoo" / "model.json").read_text())["name"] == "itransformer_etth1_96"
  _assert_matches_golden(models.load_pretrained(models.create_model("itransformer_etth1_96"), tmp_path / "zoo"),
                         arrays)


def test_cli_reports_a_mismatched_variant(golden, tmp_path, capsys):
  from safetensors.numpy import save_file
  save_file(golden[0], tmp_path / "official.safetensors")
  code = convert_main(["itransformer", str(tmp_path / "official.safetensors"), str(tmp_path / "zoo"),
                       "--model", "itransformer_etth1_720"])
  assert code == 1
  err = capsys.readouterr().err
  assert "mis-shaped: enc_embedding.value_embedding.weight expected (512, 96), got (256, 96)" in err
  assert "mis-shaped: projector.weight expected (720, 512), got (96, 256)" in err


def test_cli_sets_what_the_shapes_do_not_show(golden, tmp_path, capsys):
  """--set KEY=VALUE: a hyper-parameter the tensors do not show (iTransformer's head count)."""
  from safetensors.numpy import save_file
  save_file(golden[0], tmp_path / "official.safetensors")
  assert convert_main(["itransformer", str(tmp_path / "official.safetensors"),
                       str(tmp_path / "zoo"), "--set", "n_heads=4"]) == 0
  assert "'n_heads': 4" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    convert_main(["itransformer", str(tmp_path / "official.safetensors"), str(tmp_path / "x"),
                  "--set", "n_heads"])
  assert "expected KEY=VALUE, got 'n_heads'" in capsys.readouterr().err


# --- reading .pth without torch -------------------------------------------------------------------------------

def test_pth_reader_handles_dtypes_views_and_parameters(tmp_path):
  torch = pytest.importorskip("torch")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  saved = {"transposed": base.t(), "slice": base[1:3, 2:5], "bf16": base.to(torch.bfloat16),
           "int64": torch.arange(5), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
           "param": torch.nn.Parameter(torch.ones(3))}
  torch.save(saved, tmp_path / "t.pt")
  loaded = read_state_dict(tmp_path / "t.pt")
  for key, tensor in saved.items():
    expected = tensor.detach().float().numpy() if key == "bf16" else tensor.detach().numpy()
    np.testing.assert_array_equal(np.asarray(loaded[key], expected.dtype), expected)
  assert loaded["bf16"].dtype.name == "bfloat16" and loaded["int64"].dtype == np.int64


class _RunsAShellCommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path):
  marker = tmp_path / "pwned"
  with zipfile.ZipFile(tmp_path / "evil.pth", "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps({"w": _RunsAShellCommand(marker)}))
  with pytest.raises(ValueError, match=r"refusing to unpickle (posix|os)\.system"):
    read_state_dict(tmp_path / "evil.pth")
  assert not marker.exists()
  (tmp_path / "legacy.pth").write_bytes(pickle.dumps(_RunsAShellCommand(marker)))
  with pytest.raises(ValueError, match="not a torch.save zip archive"):
    read_state_dict(tmp_path / "legacy.pth")
  assert not marker.exists()


# --- key checks and shape inference ---------------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_keys_are_listed_together(golden):
  state_dict = dict(golden[0])
  del state_dict["encoder.norm.bias"]
  state_dict["decoder.extra.weight"] = np.zeros(3, np.float32)
  state_dict["encoder.attn_layers.1.conv1.weight"] = np.zeros((128, 256, 1), np.float32)
  with pytest.raises(ValueError) as info:
    checkpoint_filter_fn(state_dict, **models.model_info("itransformer_etth1_96").defaults)
  message = str(info.value)
  assert "3 problems" in message
  assert "missing: encoder.norm.bias (256,)" in message
  assert "unexpected: decoder.extra.weight (3,)" in message
  assert "mis-shaped: encoder.attn_layers.1.conv1.weight expected (256, 256, 1), got (128, 256, 1)" in message


def test_one_misshaped_tensor_is_the_one_reported_without_a_model_name(golden):
  state_dict = dict(golden[0], **{"encoder.attn_layers.0.conv1.weight": np.zeros((3, 256, 1),
                                                                                 np.float32)})
  with pytest.raises(ValueError) as info:
    checkpoint_filter_fn(state_dict)
  assert "1 problem" in str(info.value)
  assert ("mis-shaped: encoder.attn_layers.0.conv1.weight expected (256, 256, 1), got (3, 256, 1)"
          in str(info.value))


def test_shape_inference_of_the_variant(golden):
  state_dict = golden[0]
  _, model_class, kwargs = checkpoint_filter_fn(state_dict)
  assert model_class is iTransformer
  assert kwargs == dict(n_heads=8, seq_len=96, pred_len=96, d_model=256, d_ff=256, e_layers=2)

  # one layer fewer, and TSLib's head name
  tslib = {k.replace("projector.", "projection."): v for k, v in state_dict.items()
           if not k.startswith("encoder.attn_layers.1.")}
  params, model_class, kwargs = checkpoint_filter_fn(tslib, n_heads=4)
  assert (model_class, kwargs["e_layers"], kwargs["n_heads"]) == (iTransformer, 1, 4)
  assert list(params["blocks"]) == [0]

  # TSLib classification: projection is Linear(num_variates * d_model, num_classes)
  classifier = dict(tslib, **{"projection.weight": np.zeros((10, 7 * 256), np.float32),
                              "projection.bias": np.zeros(10, np.float32)})
  params, model_class, kwargs = checkpoint_filter_fn(classifier)
  assert model_class is iTransformerClassifier
  assert (kwargs["num_classes"], kwargs["num_variates"]) == (10, 7)
  assert params["head"]["kernel"].shape == (7 * 256, 10)


def test_conversion_layout(golden):
  state_dict = golden[0]
  params, _, _ = checkpoint_filter_fn(state_dict)
  layer = "encoder.attn_layers.0."
  qkv = params["blocks"][0]["attn"]["qkv"]["kernel"]
  np.testing.assert_array_equal(qkv[:, 256:512], state_dict[layer + "attention.key_projection.weight"].T)
  np.testing.assert_array_equal(params["blocks"][0]["mlp"]["fc1"]["kernel"], state_dict[layer + "conv1.weight"][:, :, 0].T)
  np.testing.assert_array_equal(params["norm"]["scale"], state_dict["encoder.norm.weight"])


# --- load_pretrained ------------------------------------------------------------------------------------------

def test_load_pretrained_from_params_dir_with_dont_load(tmp_path):
  source = models.create_model("itransformer_etth2_96", rngs=nnx.Rngs(1))
  models.save_params(source, tmp_path / "params")
  fresh = models.create_model("itransformer_etth2_96", rngs=nnx.Rngs(2))
  fresh_head = np.asarray(fresh.projector.kernel[...])
  models.load_pretrained(fresh, tmp_path / "params", dont_load=(r"projector/.*",))
  loaded, expected = _params(fresh), _params(source)
  np.testing.assert_array_equal(loaded["projector/kernel"], fresh_head)
  assert not np.array_equal(loaded["projector/kernel"], expected["projector/kernel"])
  for key in expected:
    if not key.startswith("projector/"):
      np.testing.assert_array_equal(loaded[key], expected[key])


def test_load_pretrained_lists_mismatches_and_keeps_dtype_and_sharding(tmp_path):
  models.save_params(models.create_model("itransformer_etth2_96"), tmp_path / "params")
  longer = models.create_model("itransformer_etth2_192")
  with pytest.raises(ValueError, match=r"mis-shaped: projector/kernel model \(128, 192\), checkpoint \(128, 96\)"):
    models.load_pretrained(longer, tmp_path / "params")
  with pytest.raises(ValueError, match="match no param path"):
    models.load_pretrained(longer, tmp_path / "params", dont_load=("head/.*",))

  half = models.create_model("itransformer_etth2_192", param_dtype=jnp.bfloat16)
  sharding = half.embed.kernel[...].sharding
  models.load_pretrained(half, tmp_path / "params", dont_load=("projector/.*",))
  assert half.embed.kernel[...].dtype == jnp.bfloat16 and half.embed.kernel[...].sharding == sharding


def test_load_pretrained_from_a_training_workdir_takes_the_latest_step(tmp_path):
  manager = ocp.CheckpointManager(tmp_path / "workdir" / "checkpoints")
  for step, seed in ((10, 1), (20, 2)):
    params = nnx.to_pure_dict(nnx.state(models.create_model("itransformer_cls_digits", rngs=nnx.Rngs(seed)),
                                        nnx.Param))
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
  manager.wait_until_finished()
  latest = _params(models.create_model("itransformer_cls_digits", rngs=nnx.Rngs(2)))
  for path in (tmp_path / "workdir", tmp_path / "workdir" / "checkpoints" / "20"):
    model = models.load_pretrained(models.create_model("itransformer_cls_digits", rngs=nnx.Rngs(0)), path)
    for key, value in _params(model).items():
      np.testing.assert_array_equal(value, latest[key])
  with pytest.raises(ValueError, match="no checkpoint at"):
    models.load_pretrained(models.create_model("itransformer_cls_digits"), tmp_path / "nowhere")


def test_load_pretrained_converts_an_official_file_on_the_fly(golden, tmp_path):
  from safetensors.numpy import save_file
  state_dict, arrays = golden
  save_file(state_dict, tmp_path / "official.safetensors")
  model = models.load_pretrained(models.create_model("itransformer_etth1_96"), tmp_path / "official.safetensors")
  _assert_matches_golden(model, arrays)
