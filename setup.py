from setuptools import find_packages, setup

setup(
    name="dreambooth-blip2",
    version="0.1.0",
    description="DreamBooth on Stable Diffusion v1 and BLIP-2 OPT, reimplemented faithfully in one codebase",
    packages=find_packages(include=["core", "core.*", "ldm", "ldm.*", "blip2", "blip2.*", "toy", "toy.*"]),
    package_data={"ldm.modules.encoders": ["bpe_simple_vocab_16e6.txt.gz"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "lightning>=2.2",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "transformers>=5.0,<6",
        "tokenizers>=0.20",
        "pillow>=10",
        "einops>=0.7",
        "tqdm",
        "tensorboard",
        "ftfy",
        "regex",
    ],
    extras_require={
        # test oracles and test data; open_clip_torch is installed with --no-deps (see .ci/run)
        # pycocoevalcap: the coco-caption BLEU / CIDEr scorers (pure Python) as an oracle for ours
        "test": ["pytest>=8", "diffusers>=0.30", "scikit-image", "accelerate", "pycocoevalcap"],
    },
)
