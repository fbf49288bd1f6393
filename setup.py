from setuptools import find_packages, setup

setup(
    name="llama_jax",
    version="0.1.0",
    description="Llama 2 in JAX/Flax: pretraining, SFT, reward models, RLHF, inference.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["llama_jax", "llama_jax.*"]),
    install_requires=[
        "jax>=0.7,<0.11",  # jax.set_mesh, AxisType (0.7+); JAX changes APIs between minors
        "flax>=0.11,<0.13",  # Linen
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "sentencepiece>=0.2,<0.3",
        "ml_collections>=1.0,<2",
        "grain>=0.2.10,<0.3",
        "numpy>=1.26,<3",
        "safetensors>=0.4,<1",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "absl-py>=1.0",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite runs on 2 workers (pyproject.toml: -n 2 --dist worksteal)
            # Interop tests compare against Hugging Face transformers on PyTorch (CPU).
            # The upper bound keeps pip on torch 2.13, whose CPU build is small.
            "torch>=2.1,<2.14",
            "transformers>=4.45,<6",
        ],
    },
)
