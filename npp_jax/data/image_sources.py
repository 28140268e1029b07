"""Image datasets to tokenize: an ImageFolder tree (PIL) or a tfds split (the `data` extra).

Both give random access to (image, label) items, so extraction can read any shard.
"""

from npp_jax.infra import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


def image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
  """([(path, label)] sorted, class names) of an ImageFolder tree (local or gs://)."""
  if not storage.isdir(root):
    raise FileNotFoundError(f"image folder {root} does not exist.")
  top = storage.as_path(root)
  classes = sorted(d.name for d in top.iterdir() if d.is_dir())
  if not classes:
    raise ValueError(f"{root} has no class sub-directories (expected root/<class>/<image>).")
  items = []
  for label, name in enumerate(classes):
    found = storage.files_under(storage.join(root, name))
    images = [(f, label) for f in found if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
      raise ValueError(
        f"class folder {storage.join(root, name)} holds no images ({', '.join(IMAGE_EXTENSIONS)}):"
        " add its images or remove the folder (every folder under the root is a class)."
      )
    items += images
  return items, classes


class TfdsItems:
  """Lazy (encoded image bytes, label) pairs of a tfds split, read by random access.

  Nothing is held in memory beyond the shard being encoded. Needs the dataset prepared in
  tfds's random-access `array_record` format (`tfds build imagenet2012
  --file_format=array_record`).
  """

  def __init__(self, name: str, split: str, data_dir: str | None):
    try:
      import tensorflow_datasets as tfds  # noqa: PLC0415 (the optional `data` extra)
    except ImportError as e:
      raise ImportError(
        "reading tfds datasets needs `pip install -e '.[data]'` in the npp_jax clone "
        "(tensorflow-datasets and tensorflow); or use an ImageFolder."
      ) from e
    try:
      self.source = tfds.data_source(
        name, split=split, data_dir=data_dir or None, decoders={"image": tfds.decode.SkipDecoding()}
      )
    except Exception as e:  # noqa: BLE001
      raise ValueError(
        f"tfds {name}:{split} cannot be read by random access ({e}); prepare it "
        f"with `tfds build {name} --file_format=array_record` or extract from an "
        "ImageFolder instead."
      ) from e
    info = tfds.builder(name, data_dir=data_dir or None).info
    self.classes = list(info.features["label"].names)
    self.data_dir = data_dir or ""

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: slice) -> list[tuple[bytes, int]]:
    # A tfds folder in a bucket is read through ArrayRecord's own client: bounded here.
    read = lambda: [self.source[i] for i in range(*index.indices(len(self)))]
    rows = storage.call_with_deadline("read the images", self.data_dir, read)
    return [(bytes(r["image"]), int(r["label"])) for r in rows]
