"""vimjax: ViT-VQGAN tokenizers and autoregressive image transformers (VIM, Parti) in JAX."""
import setuptools

setuptools.setup(
    name="vimjax",
    version="0.1.0",
    description="Pod-scale ViT-VQGAN + VIM/Parti image generators in JAX/Flax.",
    packages=setuptools.find_packages(include=["vimjax", "vimjax.*"]),
    # The CPU attention kernel's source, compiled on first use (models/cpu_attention.py).
    package_data={"vimjax.models": ["cpu_kernels.h", "cpu_attention.cc", "cpu_layer_norm.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7,<0.13",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.12,<0.3",
        "array-record>=0.7,<0.9",
        "tensorflow-datasets>=4.9.7,<5",
        "tensorflow-cpu>=2.18,<2.22",
        "tensorboard>=2.18,<2.22",
        "ml-collections>=1.0,<2",
        "clu>=0.0.12,<0.1",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "sentencepiece>=0.2,<0.3",
        "pillow>=10,<14",
        "scipy>=1.11,<2",  # FID sqrtm (as pytorch-fid and ADM); sweep fits (least squares).
        "matplotlib>=3.8,<4",  # Sweep plots.
    ],
    extras_require={
        # libtpu (via jax[tpu]) lets tests compile for TPU topologies on CPU (aot_compile).
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "hypothesis>=6.100,<7", "jax[tpu]>=0.7,<0.13"],
        "tpu": ["jax[tpu]>=0.7,<0.13"],
        "gpu": ["jax[cuda12]>=0.7,<0.13"],
    },
)
