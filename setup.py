from setuptools import setup

# `kernels/` holds only @triton.jit code; it installs as `dmoe_triton.kernels` so that the
# top-level name `kernels` (a different PyPI package that transformers probes for) stays free.
setup(
    name="dmoe-triton",
    version="0.1.0",
    description="Triton kernels for block-routed (dMoE) Mixture-of-Experts diffusion LLMs",
    python_requires=">=3.10",
    packages=["dmoe_triton", "dmoe_triton.models", "dmoe_triton.kernels"],
    package_dir={"dmoe_triton.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.4",
        "transformers>=5.0",
        "safetensors",
        "tokenizers",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["dmoe=dmoe_triton.cli:main"]},
)
