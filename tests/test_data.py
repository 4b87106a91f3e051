"""data/: TFDS builders on the real benchmark files, the iTransformer pipeline numbers, bad input, grain.

The real files are found through $ZOO_TEST_DATA (shared/data); every dataset is prepared once per
session into a temporary TFDS data dir.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import tempfile

import grain
import ml_collections
import numpy as np
import pytest
import sklearn.datasets
from etils import epath

import data
from data import builders, prepare, series, timefeatures

ETTH1_MEAN = [7.938, 2.021, 5.080, 0.746, 2.782, 0.788, 17.128]
ETTH1_STD = [5.813, 2.090, 5.519, 1.926, 1.024, 0.630, 9.176]
FOLDERS = {"ett_h1": "ett", "ett_h2": "ett", "ett_m1": "ett", "ett_m2": "ett", "weather": "weather",
           "exchange_rate": "exchange_rate", "illness": "illness", "fashion_mnist": "fashion_mnist"}


@pytest.fixture(scope="session")
def raw_dir() -> pathlib.Path:
  if not os.environ.get("ZOO_TEST_DATA"):
    pytest.skip("ZOO_TEST_DATA (the shared/data folder of real benchmark files) is not set")
  return pathlib.Path(os.environ["ZOO_TEST_DATA"])


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def config(raw_dir, tfds_dir):
  """config(name, **keys) -> a config.data dict that prepares the real dataset on first use."""
  def make(name, **keys):
    base = dict(name=name, data_dir=tfds_dir, manual_dir=str(raw_dir / FOLDERS.get(name, "")))
    if name not in ("fashion_mnist", "digits"):
      base.update(seq_len=96, pred_len=96)
    return {**base, **keys}
  return make


def load_splits(config_data):
  return [data.load(config_data, split) for split in ("train", "validation", "test")]


def read_csv_values(path: pathlib.Path) -> tuple[list[str], np.ndarray]:
  """An independent reading of a dated CSV: header and the value columns as float64."""
  header = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].split(",")
  return header, np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, len(header)),
                            encoding="utf-8")


# ----------------------------------------------------------------------------- real series files

@pytest.mark.parametrize("name, rows", [("ett_h1", (8640, 2880, 2880)), ("ett_h2", (8640, 2880, 2880)),
                                        ("ett_m1", (34560, 11520, 11520)), ("ett_m2", (34560, 11520, 11520))])
def test_ett_split_sizes(raw_dir, tfds_dir, name, rows):
  builder = builders.prepare(name, str(raw_dir / "ett"), tfds_dir)
  assert [builder.info.splits[s].num_examples for s in ("train", "validation", "test")] == list(rows)
  assert builder.info.metadata["columns"] == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


@pytest.mark.parametrize("name, windows", [("ett_h2", (8449, 2785, 2785)), ("ett_m1", (34369, 11425, 11425))])
def test_ett_window_counts(config, name, windows):
  assert [len(s) for s in load_splits(config(name))] == list(windows)


def test_splits_share_one_in_memory_series(config):
  train, val, test = load_splits(config("ett_h1"))
  assert val.values is train.values and test.marks is train.marks   # read once per process
  assert not train.values.flags.writeable


@pytest.mark.parametrize("pred_len, windows", [(96, (8449, 2785, 2785)), (720, (7825, 2161, 2161))])
def test_etth1_window_counts(config, pred_len, windows):
  assert [len(s) for s in load_splits(config("ett_h1", pred_len=pred_len))] == list(windows)


def test_etth1_scaler_fitted_on_train_rows(config, raw_dir):
  train = data.load(config("ett_h1"), "train")
  np.testing.assert_allclose(train.meta["mean"], ETTH1_MEAN, atol=1e-3)
  np.testing.assert_allclose(train.meta["std"], ETTH1_STD, atol=1e-3)
  _, raw = read_csv_values(raw_dir / "ett" / "ETTh1.csv")
  np.testing.assert_allclose(train.meta["mean"], raw[:8640].mean(0), rtol=1e-12)
  np.testing.assert_allclose(train.meta["std"], raw[:8640].std(0), rtol=1e-12)


def test_etth1_windows_take_lookback_from_previous_split(config, raw_dir):
  train, val, test = load_splits(config("ett_h1"))
  _, raw = read_csv_values(raw_dir / "ett" / "ETTh1.csv")
  scaled = ((raw - train.meta["mean"]) / train.meta["std"]).astype(np.float32)
  assert val.first_row == 8640 - 96 and test.first_row == 11520 - 96
  batch = val.gather(np.array([0, len(val) - 1]))
  np.testing.assert_array_equal(batch["x"][0], scaled[8544:8640])
  np.testing.assert_array_equal(batch["y"][0], scaled[8640:8736])
  np.testing.assert_array_equal(batch["y"][1, -1], scaled[11519])   # the last target is the split's last row
  assert batch["x"].dtype == batch["y"].dtype == batch["x_mark"].dtype == np.float32
  last = len(test) - 1
  assert test.dates[test.first_row + 96] == np.datetime64("2017-10-24T00:00")
  assert test.dates[test.first_row + last + 96 + 96 - 1] == np.datetime64("2018-02-20T23:00")


def test_etth1_time_features(config):
  train, _, test = load_splits(config("ett_h1"))
  # 2016-07-01 00:00, a Friday, day 183 of a leap year: [hour/23, dow/6, (day-1)/30, (doy-1)/365] - 0.5
  np.testing.assert_allclose(train.gather(np.array([0]))["x_mark"][0, 0], [-0.5, 4 / 6 - 0.5, -0.5, 182 / 365 - 0.5],
                             atol=1e-7)
  # The last input row of test window 0: 2017-10-23 23:00, a Monday, day of year 296.
  np.testing.assert_allclose(test.gather(np.array([0]))["x_mark"][0, -1],
                             [0.5, -0.5, 22 / 30 - 0.5, 295 / 365 - 0.5], atol=1e-7)
  assert train.meta["n_marks"] == 4
  assert "x_mark" not in data.load(config("ett_h1", time_marks=False), "train").gather(np.array([0]))


@pytest.mark.parametrize("name, file, rows, n_vars", [
    ("weather", "weather.csv", 52696, 21),
    ("exchange_rate", "exchange_rate.csv", 7588, 8),
    ("illness", "national_illness.csv", 966, 7),
])
def test_custom_protocol_datasets(config, raw_dir, name, file, rows, n_vars):
  seq_len, pred_len = (36, 24) if name == "illness" else (96, 96)
  train, val, test = load_splits(config(name, seq_len=seq_len, pred_len=pred_len))
  num_train, num_test = int(0.7 * rows), int(0.2 * rows)
  num_val = rows - num_train - num_test
  assert [len(train), len(val), len(test)] == [num_train - seq_len - pred_len + 1,
                                               num_val - pred_len + 1, num_test - pred_len + 1]
  header, raw = read_csv_values(raw_dir / FOLDERS[name] / file)
  assert train.meta["columns"] == tuple(header[1:]) and train.meta["columns"][-1] == "OT"
  assert train.meta["n_vars"] == n_vars
  # float64 end to end: the stored values are the file's, the scaler's statistics numpy's.
  np.testing.assert_allclose(train.meta["mean"], raw[:num_train].mean(0), rtol=1e-12)
  np.testing.assert_allclose(train.meta["std"], raw[:num_train].std(0), rtol=1e-12)
  scaled = ((raw - raw[:num_train].mean(0)) / raw[:num_train].std(0)).astype(np.float32)
  np.testing.assert_allclose(test.gather(np.array([0]))["x"][0], scaled[rows - num_test - seq_len:rows - num_test],
                             rtol=1e-6, atol=1e-6)


def test_exchange_rate_dates_in_slash_format(config):
  train = data.load(config("exchange_rate"), "train")
  assert train.dates[0] == np.datetime64("1990-01-01T00:00") and train.dates[1] == np.datetime64("1990-01-02")


def test_custom_csv_moves_target_last(tmp_path, tfds_dir):
  rng = np.random.default_rng(0)
  values = rng.normal(size=(60, 3))
  dates = np.arange(np.datetime64("2020-01-01T00"), np.datetime64("2020-01-01T00") + 60)
  lines = ["a,OT,date,b"] + [f"{v[0]},{v[1]},{d.astype(datetime.datetime):%Y-%m-%d %H:%M:%S},{v[2]}"
                             for v, d in zip(values, dates)]
  (tmp_path / "My Sensors.csv").write_text("\ufeff" + "\r\n".join(lines) + "\r\n")   # BOM, CRLF
  config_data = dict(name="custom", file="My Sensors.csv", manual_dir=str(tmp_path), data_dir=tfds_dir,
                     seq_len=8, pred_len=4)
  train = data.load(config_data, "train")
  assert train.meta["columns"] == ("a", "b", "OT")
  assert (pathlib.Path(tfds_dir) / "zoo_series" / "custom_my_sensors").is_dir()
  reordered = values[:, [0, 2, 1]]
  expected = (reordered - reordered[:42].mean(0)) / reordered[:42].std(0)
  np.testing.assert_allclose(train.gather(np.array([3]))["x"][0], expected[3:11], rtol=1e-5, atol=1e-6)
  assert len(train) == 42 - 8 - 4 + 1


# ----------------------------------------------------------------------------- Solar and PEMS (synthetic)

def test_solar_protocol_keeps_unassigned_rows_as_lookback(tmp_path, tfds_dir):
  values = np.random.default_rng(1).uniform(0, 5, size=(103, 3)).round(3)
  (tmp_path / "solar_AL.txt").write_text("\n".join(",".join(map(str, row)) for row in values) + "\n")
  config_data = dict(name="solar", manual_dir=str(tmp_path), data_dir=str(tmp_path / "tfds"),
                     seq_len=8, pred_len=4)
  builder = builders.prepare("solar", str(tmp_path), str(tmp_path / "tfds"))
  # train int(0.7 n) = 72, validation int(0.1 n) = 10, test int(0.2 n) = 20: row 82 belongs to none.
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      "train": 72, "validation": 10, "test": 20, "lookback": 1}
  train, val, test = load_splits(config_data)
  assert [len(train), len(val), len(test)] == [72 - 12 + 1, 10 - 4 + 1, 20 - 4 + 1]
  scaled = (values - values[:72].mean(0)) / values[:72].std(0)
  np.testing.assert_allclose(test.gather(np.array([0]))["x"][0], scaled[75:83], rtol=1e-5, atol=1e-6)
  assert "x_mark" not in test.spec
  with pytest.raises(data.DataError, match="no timestamps"):
    data.load({**config_data, "time_marks": True}, "train")


def test_pems_protocol_windows_each_split_alone_and_fills_nans(tmp_path):
  flow = np.random.default_rng(2).uniform(0, 100, size=(50, 4))
  flow[30, 1] = np.nan   # first row of validation: bfill from row 31, not ffill from train
  flow[45, 2] = np.nan   # inside test: ffill from row 44
  flow[3, 0] = np.nan    # in train: ignored by the scaler, then filled
  np.savez(tmp_path / "PEMS08.npz", data=np.stack([flow, -flow], axis=-1))
  config_data = dict(name="pems08", manual_dir=str(tmp_path), data_dir=str(tmp_path / "tfds"),
                     seq_len=4, pred_len=2, time_marks=False)
  train, val, test = load_splits(config_data)
  assert [len(train), len(val), len(test)] == [30 - 6 + 1, 10 - 6 + 1, 10 - 6 + 1]
  assert val.first_row == 30 and test.first_row == 40
  mean, std = np.nanmean(flow[:30], 0), np.nanstd(flow[:30], 0)
  np.testing.assert_allclose(train.meta["mean"], mean)
  np.testing.assert_allclose(train.meta["std"], std)
  scaled = (flow - mean) / std
  np.testing.assert_allclose(val.gather(np.array([0]))["x"][0, 0, 1], scaled[31, 1], rtol=1e-6)
  np.testing.assert_allclose(test.gather(np.array([4]))["x"][0, 1, 2], scaled[44, 2], rtol=1e-6)
  np.testing.assert_allclose(train.gather(np.array([0]))["x"][0, 3, 0], scaled[2, 0], rtol=1e-6)
  assert not any(np.isnan(s.gather(np.arange(len(s)))["x"]).any() for s in (train, val, test))


def test_fill_nans_matches_pandas_ffill_then_bfill():
  column = np.array([np.nan, np.nan, 1.0, np.nan, 3.0, np.nan])[:, None]
  np.testing.assert_array_equal(series.fill_nans(column)[:, 0], [1, 1, 1, 1, 3, 3])


# ----------------------------------------------------------------------------- images

def test_fashion_mnist(raw_dir, tfds_dir, config):
  builder = builders.prepare("fashion_mnist", str(raw_dir / "fashion_mnist"), tfds_dir)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 60000, "test": 10000}
  test = data.load(config("fashion_mnist"), "test")   # reading the 60000 train records takes seconds
  assert test.meta["num_classes"] == 10 and test.meta["image_shape"] == (28, 28, 1)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  assert (test.labels * np.arange(10000)).sum() == 225732341
  assert test.images.sum(dtype=np.int64) == 573469082
  batch = test.gather(np.array([0, 1]))
  assert batch["label"].tolist() == [9, 2] and batch["label"].dtype == np.int32
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (2, 28, 28, 1)
  np.testing.assert_allclose(batch["image"][0].sum(), 33456 / 255, rtol=1e-5)
  with pytest.raises(data.DataError, match="has no split 'validation'"):
    data.load(config("fashion_mnist"), "validation")


def test_digits_is_embedded_and_split_fixed(tfds_dir):
  config_data = ml_collections.ConfigDict(dict(name="digits", data_dir=tfds_dir, manual_dir=""))
  splits = load_splits(config_data)
  assert [len(s) for s in splits] == [1257, 179, 361]
  batch = splits[0].gather(np.arange(len(splits[0])))
  assert batch["image"].shape == (1257, 8, 8, 1) and batch["image"].min() == 0 and batch["image"].max() == 1
  assert set(batch["label"].tolist()) == set(range(10))
  assert splits[0].spec == {"image": ((8, 8, 1), np.float32), "label": ((), np.int32)}
  # The documented split: a seeded permutation of load_digits() in its order.
  digits = sklearn.datasets.load_digits()
  order = np.random.default_rng(0).permutation(1797)
  np.testing.assert_array_equal(splits[2].labels, digits.target[order[1436:]])
  np.testing.assert_allclose(splits[1].gather(np.array([5]))["image"][0, ..., 0],
                             digits.images[order[1257 + 5]] / 16)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def ett_text(raw_dir) -> str:
  return (raw_dir / "ett" / "ETTh1.csv").read_text()


def refuse(tmp_path, name, files: dict[str, str], match: str, **config_keys):
  """Writes `files` to a fresh manual_dir; preparing `name` must raise DataError matching `match`."""
  case_dir = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
  manual_dir = case_dir / "raw"
  manual_dir.mkdir()
  for file, text in files.items():
    (manual_dir / file).write_text(text)
  config_data = dict(name=name, manual_dir=str(manual_dir), data_dir=str(case_dir / "tfds"),
                     seq_len=96, pred_len=96, **config_keys)
  with pytest.raises(data.DataError, match=match) as error:
    data.load(config_data, "train")
  dataset = data.catalog.lookup(name, config_keys.get("file", ""))
  assert not builders.is_prepared(builders.make_builder(dataset, config_data["data_dir"]))
  return str(error.value)


def test_missing_file_says_where_to_get_it(tmp_path):
  message = refuse(tmp_path, "ett_h1", {}, "ETTh1.csv not found")
  assert "github.com/zhouhaoyi/ETDataset" in message
  assert "Google-Drive" in refuse(tmp_path, "weather", {}, "weather.csv not found")


def test_missing_column(tmp_path, ett_text):
  text = "\n".join(",".join(row.split(",")[:4] + row.split(",")[5:]) for row in ett_text.splitlines())
  refuse(tmp_path, "ett_h1", {"ETTh1.csv": text}, r"missing column\(s\) \['MULL'\]")


def test_extra_column(tmp_path, ett_text):
  text = "\n".join(row + ",0" for row in ett_text.splitlines())
  refuse(tmp_path, "ett_h1", {"ETTh1.csv": text}, r"unexpected column\(s\) \['0'\]")


def test_nan_and_unparsable_values(tmp_path, ett_text):
  lines = ett_text.splitlines()
  lines[101] = lines[101].replace(lines[101].split(",")[3], "nan")
  refuse(tmp_path, "ett_h1", {"ETTh1.csv": "\n".join(lines)}, "line 102, column 'MUFL'.*NaN")
  lines[101] = lines[101].replace("nan", "")
  refuse(tmp_path, "ett_h1", {"ETTh1.csv": "\n".join(lines)}, "line 102, column 'MUFL': cannot read ''")


def test_unparsable_date(tmp_path, ett_text):
  lines = ett_text.splitlines()
  lines[5] = "2016-07-01 xx:00:00" + lines[5][19:]
  refuse(tmp_path, "ett_h1", {"ETTh1.csv": "\n".join(lines)}, "line 6: cannot read date '2016-07-01 xx:00:00'")


def test_wrong_row_count(tmp_path, ett_text):
  text = "\n".join(ett_text.splitlines()[:1001])
  refuse(tmp_path, "ett_h1", {"ETTh1.csv": text}, "1000 data rows, but the published ETTh1.csv has 17420")


def test_custom_csv_without_target_or_rows(tmp_path):
  refuse(tmp_path, "custom", {"x.csv": "date,a\n2020-01-01,1\n"}, "missing column 'OT'", file="x.csv")
  refuse(tmp_path, "custom", {"x.csv": "date,OT\n2020-01-01,1\n2020-01-02,2\n"},
         r"2 rows are too few for the custom protocol: split\(s\) \['test'\] would be empty", file="x.csv")


def test_not_prepared_names_the_prepare_command(tmp_path):
  with pytest.raises(data.DataError, match="python -m data.prepare ett_h1 --manual_dir DIR"):
    data.load(dict(name="ett_h1", data_dir=str(tmp_path), manual_dir="", seq_len=96, pred_len=96), "train")
  with pytest.raises(data.DataError, match="did you mean 'ett_h1'"):
    data.load(dict(name="ETTh1", data_dir=str(tmp_path)), "train")


def test_prepare_cli(tmp_path, raw_dir, capsys):
  assert prepare.main(["ett_h2", "--manual_dir", str(tmp_path), "--data_dir", str(tmp_path / "tfds")]) == 2
  assert "error: ETTh2.csv not found" in capsys.readouterr().err
  assert prepare.main(["illness", "--manual_dir", str(raw_dir / "illness"),
                       "--data_dir", str(tmp_path / "tfds")]) == 0
  assert "train 676, validation 97, test 193" in capsys.readouterr().out


# ----------------------------------------------------------------------------- time features

def test_time_features_match_the_calendar():
  stamps = [datetime.datetime(2020, 12, 31, 23, 59, 58), datetime.datetime(2021, 1, 1, 0, 0, 1),
            datetime.datetime(2018, 12, 31, 12, 30), datetime.datetime(1969, 12, 31, 6, 15, 30)]
  dates = np.array(stamps, "datetime64[s]")
  got = timefeatures.time_features(dates, "s")
  for row, stamp in zip(got, stamps):
    expected = [stamp.second / 59, stamp.minute / 59, stamp.hour / 23, stamp.weekday() / 6,
                (stamp.day - 1) / 30, (stamp.timetuple().tm_yday - 1) / 365]
    np.testing.assert_allclose(row, np.array(expected) - 0.5, atol=1e-12)
  weeks = timefeatures.time_features(dates, "w")[:, 1]
  np.testing.assert_allclose(weeks, [(s.isocalendar().week - 1) / 52 - 0.5 for s in stamps], atol=1e-12)
  assert [timefeatures.time_features(dates, f).shape[1] for f in ("h", "15min", "t", "d", "b", "m", "y")] == [
      4, 5, 5, 3, 3, 1, 0]
  with pytest.raises(data.DataError, match="unsupported time-feature frequency"):
    timefeatures.time_features(dates, "fortnight")


# ----------------------------------------------------------------------------- pipelines

class IndexSplit:
  """A split whose examples are their own indices: shows exactly what a pipeline gathered."""

  def __init__(self, size):
    self.size = size

  def __len__(self):
    return self.size

  def gather(self, idx):
    return {"index": np.asarray(idx)}


def test_train_batches_are_per_epoch_permutations():
  split, batch_size, seed = IndexSplit(103), 10, 7
  steps = data.steps_per_epoch(split, batch_size)
  assert steps == 10
  dataset = data.train_batches(split, batch_size, seed)
  epochs = [np.concatenate([dataset[e * steps + s]["index"] for s in range(steps)]) for e in range(2)]
  for epoch, order in enumerate(epochs):
    assert len(set(order.tolist())) == 100   # no repeats within an epoch
    np.testing.assert_array_equal(order, np.random.default_rng([seed, epoch]).permutation(103)[:100])
  assert not np.array_equal(epochs[0], epochs[1])


def test_train_batches_split_over_processes():
  split = IndexSplit(103)
  halves = [data.train_batches(split, 10, 3, process_index=p, process_count=2) for p in range(2)]
  whole = data.train_batches(split, 10, 3)
  for step in (0, 9, 10, 25):
    a, b = halves[0][step]["index"], halves[1][step]["index"]
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    np.testing.assert_array_equal(np.concatenate([a, b]), whole[step]["index"])


def test_train_iterator_checkpoint_restores_the_next_batch(config, tmp_path):
  split = data.load(config("ett_h1"), "train")
  iterator = iter(data.train_batches(split, 32, seed=0))
  for _ in range(3):
    next(iterator)
  directory = epath.Path(tmp_path)
  grain.checkpoint.CheckpointHandler().save(directory, args=grain.checkpoint.CheckpointSave(iterator))
  expected = next(iterator)
  restored = grain.checkpoint.CheckpointHandler().restore(
      directory, args=grain.checkpoint.CheckpointRestore(iter(data.train_batches(split, 32, seed=0))))
  batch = next(restored)
  assert batch.keys() == expected.keys() == {"x", "x_mark", "y"}
  for key in batch:
    np.testing.assert_array_equal(batch[key], expected[key])
  assert batch["x"].shape == (32, 96, 7)


def test_eval_batches_cover_every_example_once():
  split = IndexSplit(103)
  batches = list(data.eval_batches(split, 10))
  assert len(batches) == 11 and all(b["index"].shape == b["mask"].shape == (10,) for b in batches)
  real = np.concatenate([b["index"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(real, np.arange(103))
  np.testing.assert_array_equal(batches[-1]["index"], [100, 101, 102] + [102] * 7)
  np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 1] + [0] * 7)
  halves = [list(data.eval_batches(split, 10, process_index=p, process_count=2)) for p in range(2)]
  real = np.concatenate([b["index"][b["mask"] == 1] for pair in zip(*halves) for b in pair])
  np.testing.assert_array_equal(real, np.arange(103))


def test_eval_batches_of_a_real_split(config):
  test = data.load(config("ett_h1"), "test")
  batches = list(data.eval_batches(test, 256))
  assert sum(b["mask"].sum() for b in batches) == len(test) == 2785
  assert {b["x"].shape for b in batches} == {(256, 96, 7)}


def test_gather_refuses_out_of_range_indices(config):
  train = data.load(config("ett_h1"), "train")
  with pytest.raises(IndexError):
    train.gather(np.array([len(train)]))
  with pytest.raises(IndexError):
    train.gather(np.array([-1]))
