"""ImageFolder -> extract -> the trainer's input pipeline; corrupt images; resuming."""

import logging
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from npp_jax import config_lib, tokenizers
from npp_jax.data import image_sources, pipeline, preprocess
from npp_jax.data.records import DatasetInfo
from npp_jax.infra import preemption
from npp_jax.jobs import extract, train

from .conftest import require_tfds
from .manifest_weights import generate


@pytest.fixture()
def folder(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "images"
  for k, name in enumerate(["cat", "dog", "owl"]):
    (root / name).mkdir(parents=True)
    for i in range(5):
      h, w = 70 + 10 * i, 100 - 5 * i
      arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
      arr[..., k] = 255  # a class-dependent colour
      ext = "png" if i % 2 else "jpg"
      Image.fromarray(arr).save(root / name / f"img{i}.{ext}")
  (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  (root / "dog" / "notes.txt").write_text("not an image")
  return root


def _config(tmp_path, folder):
  sd = generate(os.path.join(os.path.dirname(__file__), "golden", "vq_tiny_manifest.json"))
  np.savez(tmp_path / "vq.npz", **sd)
  c = config_lib.get_config("tiny")
  c.model.update(vocab_size=64, num_classes=3, grid=4, dim=32, n_head=2, multiple_of=32)
  c.model.update(dtype="float32", preset=config_lib.CUSTOM)
  # The golden tokenizer is VQ-16 at width 32.
  c.tokenizer.update(name="vq", preset="VQ-16", ch=32, z_channels=64)
  c.tokenizer.checkpoint = str(tmp_path / "vq.npz")
  c.extract.update(
    data_dir=str(folder),
    image_size=64,
    images_per_shard=4,
    batch_size=16,
    out_dir=str(tmp_path / "codes"),
    num_workers=2,
  )
  return c


def test_extract_folder_into_training_shards(tmp_path, folder, caplog):
  c = _config(tmp_path, folder)
  with caplog.at_level(logging.WARNING):
    report = extract.run(c, str(tmp_path / "wd"))
  assert report["images"] == 15 and report["skipped"] == 1
  assert report["skipped_images"][0]["image"].endswith("dog/broken.jpg")
  assert "unreadable image" in report["skipped_images"][0]["error"]
  info = DatasetInfo.load(report["dataset"])
  assert (
    info.num_records,
    info.grid,
    info.vocab_size,
    info.num_classes,
    info.n_aug,
    info.image_size,
  ) == (15, 4, 64, 3, 10, 64)
  assert info.shard_sizes == (4, 3, 4, 4)  # the broken image was in the second shard
  src = pipeline.TokenSource(report["dataset"], 64, 3, 4)
  labels = [int(src[i]["label"]) for i in range(15)]
  assert labels == [0] * 5 + [1] * 5 + [2] * 5
  # Codes equal a direct encode of the ten crops of the first image.
  tok = tokenizers.VQTokenizer(*tokenizers.load_vq(c))
  crops = preprocess.variants(Image.open(folder / "cat" / "img0.jpg"), 64, True, 1.1)
  want = np.asarray(tok.encode(crops)).reshape(10, 16)
  np.testing.assert_array_equal(src[0]["codes"], want)
  assert not np.array_equal(want[0], want[5]), "mirrored crops differ"
  # ... and they feed the trainer's pipeline.
  c.data.path = report["dataset"]
  c.train.update(global_batch_size=8, epochs=4, patch_level=2, epoch_rate=0.5)
  trainer = train.Trainer(c, str(tmp_path / "train"))
  batch = next(trainer.data_iter)
  assert batch["tokens"].shape == (8, 16) and batch["label"].shape == (8,)


def test_extract_resumes_with_identical_shards(tmp_path, folder):
  c = _config(tmp_path, folder)
  c.extract.ten_crop = False
  first = extract.run(c, str(tmp_path / "wd"))
  out = first["dataset"]
  files = sorted(f for f in os.listdir(out) if f.endswith(".array_record"))
  data = {}
  for f in files:
    with open(os.path.join(out, f), "rb") as fh:
      data[f] = fh.read()
  stamp = os.path.getmtime(os.path.join(out, files[0]))
  os.remove(os.path.join(out, files[2]))
  os.remove(os.path.join(out, files[2] + ".json"))
  again = extract.run(c, str(tmp_path / "wd"))
  assert again["images"] == 15 and DatasetInfo.load(out).n_aug == 2
  assert os.path.getmtime(os.path.join(out, files[0])) == stamp, "finished shards are kept"
  for f in files:
    with open(os.path.join(out, f), "rb") as fh:
      assert fh.read() == data[f], f


def test_extract_warns_about_size_and_checks_inputs(tmp_path, folder, caplog):
  c = _config(tmp_path, folder)
  c.extract.image_size = 128
  c.extract.images_per_shard = 100
  with caplog.at_level(logging.WARNING):
    extract.run(c, str(tmp_path / "wd"))
  assert "train at the size you extract at" in caplog.text
  c.extract.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    extract.run(c, str(tmp_path / "wd2"))
  c.extract.update(data_dir=str(folder), image_size=72)
  with pytest.raises(ValueError, match="not a multiple of the tokenizer's downsampling factor 16"):
    extract.run(c, str(tmp_path / "wd3"))


def test_tfds_source_without_tensorflow_names_the_extra(tmp_path, folder, monkeypatch):
  import builtins

  real_import = builtins.__import__

  def no_tfds(name, *args, **kwargs):
    if name == "tensorflow_datasets":
      raise ImportError("No module named 'tensorflow_datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_tfds)
  c = _config(tmp_path, folder)
  c.extract.source = "tfds"
  with pytest.raises(ImportError, match=r"pip install -e '\.\[data\]'. in the npp_jax clone"):
    extract.run(c, str(tmp_path / "wd"))


def _tfds_copy_of(folder, data_dir):
  """The ImageFolder's files, corrupt one included, as a tfds dataset in the random-access
  `array_record` format, in the ImageFolder's order (shuffling off)."""
  tfds = require_tfds()
  items, classes = image_sources.image_folder(str(folder))

  class NppTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(names=classes)}
      return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (path, label) in enumerate(items):
        with open(path, "rb") as f:
          yield f"{i:05d}", {"image": f.read(), "label": label}

  NppTestImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return "npp_test_images", len(items)


def test_tfds_source_gives_the_codes_of_the_image_folder(tmp_path, folder):
  name, n = _tfds_copy_of(folder, tmp_path / "tfds")
  assert n == 16  # 15 images and the broken one
  c = _config(tmp_path, folder)
  want = extract.run(c, str(tmp_path / "wd"))
  c.extract.update(
    source="tfds",
    tfds_name=name,
    split="train",
    data_dir=str(tmp_path / "tfds"),
    out_dir=str(tmp_path / "codes_tfds"),
  )
  got = extract.run(c, str(tmp_path / "wd_tfds"))
  assert got["images"] == 15 and got["skipped"] == 1
  # Read by record: the broken image is named by its label (tfds keeps no file name).
  assert got["skipped_images"][0]["image"] == "record with label 1"
  assert "unreadable image" in got["skipped_images"][0]["error"]
  a, b = DatasetInfo.load(want["dataset"]), DatasetInfo.load(got["dataset"])
  assert (a.num_records, a.shard_sizes, a.num_classes) == (b.num_records, b.shard_sizes, 3)
  src_a = pipeline.TokenSource(want["dataset"], 64, 3, 4)
  src_b = pipeline.TokenSource(got["dataset"], 64, 3, 4)
  for i in range(15):
    np.testing.assert_array_equal(src_b[i]["codes"], src_a[i]["codes"])
    assert int(src_b[i]["label"]) == int(src_a[i]["label"])


def _records(dataset):
  info = DatasetInfo.load(dataset)
  src = pipeline.TokenSource(dataset, 64, 3, info.grid)
  return [(np.asarray(src[i]["codes"]), int(src[i]["label"])) for i in range(info.num_records)]


def test_streamed_codes_are_every_image_encoded_alone(tmp_path, folder):
  """Streaming (a device batch at a time, whatever the shard) writes, record by record, the
  codes of each image's variants encoded on their own, for any batch and shard size."""
  c = _config(tmp_path, folder)
  c.extract.ten_crop = False
  a = _records(extract.run(c, str(tmp_path / "wd"))["dataset"])
  c.extract.update(batch_size=7, images_per_shard=100, out_dir=str(tmp_path / "codes_b"))
  b = _records(extract.run(c, str(tmp_path / "wd_b"))["dataset"])
  tok = tokenizers.VQTokenizer(*tokenizers.load_vq(c))
  items, _ = image_sources.image_folder(str(folder))
  items = [it for it in items if not it[0].endswith("broken.jpg")]
  assert len(a) == len(b) == len(items) == 15
  for (path, label), (codes_a, label_a), (codes_b, label_b) in zip(items, a, b, strict=True):
    crops = preprocess.variants(Image.open(path), 64, False, 1.1)
    want = np.asarray(tok.encode(crops)).reshape(2, 16)
    np.testing.assert_array_equal(codes_a, want)
    np.testing.assert_array_equal(codes_b, want)
    assert label_a == label_b == label


def test_decoding_stays_a_bounded_window_ahead():
  """The decoding pool never runs more than `window` images ahead of what is taken: host
  memory holds a few batches whatever the shard size."""
  import concurrent.futures

  taken, submitted = [], []

  def items():
    for i in range(50):
      submitted.append(i)
      assert len(submitted) - len(taken) <= 4, (len(submitted), len(taken))
      yield (i, 0)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for item, result in extract._decoded(items(), lambda it: it[0] * 2, pool, window=4):
      taken.append(item)
      assert result == item[0] * 2
  assert [i for i, _ in taken] == list(range(50))


def test_sigterm_stops_within_a_batch_keeps_finished_shards_and_resumes(tmp_path, folder):
  """SIGTERM while the third shard is being encoded: the two finished shards are kept, no
  partial file is left, the command's exit status would be 143, and a rerun finishes the same
  shards as an uninterrupted run."""
  import signal

  c = _config(tmp_path, folder)
  c.extract.update(ten_crop=False, batch_size=8)  # a device batch: 4 images (a shard)
  want = extract.run(c, str(tmp_path / "wd_ref"))["dataset"]
  c.extract.out_dir = str(tmp_path / "codes_stopped")
  real_encode, batches = extract.Encoder.__call__, []

  def encode_then_sigterm(self, images):
    batches.append(len(images))
    if len(batches) == 3:  # the third shard's (its second holds the broken image)
      os.kill(os.getpid(), signal.SIGTERM)
    return real_encode(self, images)

  before = signal.getsignal(signal.SIGTERM)
  extract.Encoder.__call__ = encode_then_sigterm
  try:
    with pytest.raises(preemption.StoppedBySignalError) as e:
      extract.run(c, str(tmp_path / "wd"))
  finally:
    extract.Encoder.__call__ = real_encode
  assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
  assert e.value.exit_status == 128 + signal.SIGTERM
  assert "SIGTERM: 2 of this host's 4 shards are complete" in str(e.value)
  assert "no partial train-00002.array_record is left" in str(e.value)
  out = tmp_path / "codes_stopped"
  left = sorted(f for f in os.listdir(out) if "array_record" in f)
  done = ["train-00000.array_record", "train-00000.array_record.json"]
  assert left == [*done, *(f.replace("00000", "00001") for f in done)], left
  assert len(batches) == 3  # nothing encoded after the batch the signal came in
  again = _records(extract.run(c, str(tmp_path / "wd"))["dataset"])
  assert len(again) == 15
  for (codes, label), (codes_ref, label_ref) in zip(again, _records(want), strict=True):
    np.testing.assert_array_equal(codes, codes_ref)
    assert label == label_ref


def test_a_rerun_with_other_settings_changes_nothing(tmp_path, folder):
  """Extracting again into the same folder with other settings (here the variants) is
  refused before anything is encoded: the shards, dataset.json and the recorded settings
  stay byte for byte; dataset.json names the classes."""
  c = _config(tmp_path, folder)
  out = extract.run(c, str(tmp_path / "wd"))["dataset"]
  assert DatasetInfo.load(out).class_names == ("cat", "dog", "owl")
  files = lambda: {f.name: f.read_bytes() for f in sorted(pathlib.Path(out).iterdir())}
  before = files()
  assert "extract_settings.json" in before
  c.extract.ten_crop = False
  with pytest.raises(ValueError, match="holds codes extracted with other settings") as e:
    extract.run(c, str(tmp_path / "wd"))
  assert "ten_crop: True -> False" in str(e.value) and "out_dir=NEW_DIR" in str(e.value)
  assert files() == before


def test_an_empty_class_folder_is_refused(tmp_path, folder):
  (folder / "empty").mkdir()
  (folder / "empty" / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match=r"class folder .*empty holds no images"):
    extract.run(_config(tmp_path, folder), str(tmp_path / "wd"))
