"""glide-jax: train and sample GLIDE-style text-to-image diffusion models in JAX/Flax."""
import pathlib

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "chex>=0.1.89",
    "ml-collections>=1.0",
    # config overrides are parsed by ml_collections.config_flags, on an absl FlagValues of their own.
    "absl-py>=1.4",
    "numpy>=1.26",
    "scipy>=1.11",
    "tensorflow-cpu>=2.18",
    "tensorflow-datasets>=4.9.7",
    # prepared data is written and read as ArrayRecord (random access with no pass over the
    # records); tensorflow-datasets requires it on Linux only (macOS arm64 wheels exist too).
    "array_record>=0.5",
    # tensorflow-datasets imports it at builder construction but does not declare it.
    "importlib_resources>=6",
    "sentencepiece>=0.2",
    "tokenizers>=0.20",
    # the CLIP tokenizer fixes text with it before BPE, as CLIP's simple_tokenizer does.
    "ftfy>=6",
    "safetensors>=0.4",
    "pillow>=10",
    # expands WebDataset shard patterns (DIR/{00000..00099}.tar) as webdataset itself does.
    "braceexpand>=0.1.7",
    "tqdm>=4.66",
    # one process prepares glide_shapes while the others wait (glide_jax/data/pipeline.py).
    "filelock>=3.12",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
]

EXTRAS = {
    # playwright drives the app's page in tests/test_app_browser.py with Debian's chromium
    # (apt-get install chromium; launch/test.sh installs it when it can), not a downloaded browser.
    # ruff pinned: its default rules grow between releases, and tests/test_style.py holds the tree to them.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff==0.17.6", "gradio>=6,<7", "playwright>=1.50"],
    # `glide-jax app`: the interactive editor in the browser (docs/app.md).
    "app": ["gradio>=6,<7"],
    # libtpu lets `glide-jax plan` compile ahead of time for TPU topologies from a CPU machine.
    # jax 0.10.2's own [tpu] extra pins libtpu 0.0.42.*, the release `glide-jax plan` was run with.
    "tpu": ["jax[tpu]", "libtpu==0.0.42.*"],
    # NVIDIA GPUs: the CUDA build jax's install table names (jax 0.10: CUDA 13, driver >= 580; on an
    # older driver install "jax[cuda12]" instead).
    "gpu": ["jax[cuda13]"],
    # `glide-jax plan --topology h100:8` on a machine without a GPU: jax's CUDA plugin alone (no CUDA
    # libraries) compiles for a described GPU.
    "gpu-plan": ["jax[cuda13-local]"],
    # Only needed to read or write `.pt` files; safetensors works without it.
    "torch": ["torch>=2.4"],
}

setup(
    name="glide-jax",
    version="0.1.0",
    description="GLIDE text-to-image diffusion in JAX/Flax: models, samplers, sharded training.",
    long_description=pathlib.Path("README.md").read_text() if pathlib.Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["glide_jax", "glide_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["glide-jax=glide_jax.cli:main"]},
)
