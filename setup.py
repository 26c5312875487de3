from setuptools import find_packages, setup

setup(
    name="mdpo-fast",
    version="0.1.0",
    description="Fast, lean mDPO preference training for vision-language models, with a fused log-prob loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mdpo_fast", "mdpo_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",  # 2.11: what GPU images carry; CI runs the pinned 2.13
        "triton>=3.6; platform_system == 'Linux'",  # 3.6 (torch 2.11's) and the newest: both tested in CI
        "transformers>=5.0",
        "peft>=0.17",
        "accelerate>=1.15",  # its FSDP2 setup keeps the LM head unsharded between forward and backward
        "datasets>=3.0",
        "pillow",
        "numpy",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "ruff", "hypothesis"],
        "flash-attn": ["flash-attn"],
        "bench": ["matplotlib"],  # the benchmarks' plots
    },
    entry_points={"console_scripts": ["mdpo-fast=mdpo_fast.cli:main"]},
)
