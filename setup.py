from setuptools import find_packages, setup

setup(
    name="dreambooth-blip2",
    version="0.1.0",
    description="DreamBooth on Stable Diffusion v1 and BLIP-2 OPT, reimplemented faithfully in one codebase",
    # scripts/ and benchmarks/ are packages too, so that they run from anywhere without sys.path edits
    packages=find_packages(include=["core", "core.*", "ldm", "ldm.*", "blip2", "blip2.*", "toy", "toy.*",
                                    "scripts", "benchmarks"]),
    package_data={"ldm.modules.encoders": ["bpe_simple_vocab_16e6.txt.gz"]},
    python_requires=">=3.10",
    # the same entry points as `python main.py`, `python scripts/<x>.py`, `python -m blip2.export`
    entry_points={"console_scripts": [
        "db2-train = core.trainer:main",
        "db2-sample = scripts.sample:main",
        "db2-export = scripts.export:main",
        "db2-export-lora = scripts.export_lora:main",
        "db2-caption = scripts.caption:main",
        "db2-retrieve = scripts.retrieve:main",
        "db2-export-blip2 = blip2.export:main",
        "db2-evaluate-toy = toy.evaluate:main",
        "db2-evaluate-blip2 = scripts.evaluate_blip2:main",
    ]},
    install_requires=[
        "torch>=2.1",
        "numpy",
        "lightning>=2.2",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "transformers>=5.0,<6",
        "tokenizers>=0.20",
        "pillow>=10.1",  # ImageFont.load_default(size=...)
        "einops>=0.7",
        "tqdm",
        "tensorboard",
        "ftfy",
        "regex",
    ],
    extras_require={
        # model.params.optimizer: adamw8bit (core.optim)
        "8bit": ["bitsandbytes>=0.45"],
        # test oracles and test data; open_clip_torch is installed with --no-deps (see .ci/run)
        # pycocoevalcap: the coco-caption BLEU / CIDEr scorers (pure Python) as an oracle for ours
        # peft: diffusers' load_lora_weights needs it (the oracle of our LoRA files)
        # matplotlib: the figures of benchmarks/scaling.py (--plot)
        "test": ["pytest>=8", "diffusers>=0.30", "scikit-image", "accelerate", "pycocoevalcap", "peft",
                 "bitsandbytes>=0.45", "matplotlib>=3.7"],
    },
)
