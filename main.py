"""Train from OmegaConf configs (DreamBooth, latent diffusion, the autoencoder, BLIP-2): the CompVis
command line. The trainer lives in ``core.trainer``; ``python main.py --help`` lists the options.

    python main.py --base configs/dreambooth.yaml -t --actual_resume sd-v1-4.ckpt \\
        --data_root data/dog --reg_data_root data/dog_class --class_word dog -n dog
    python main.py -r logs/<time>_dog -t          # resume: saved configs, checkpoints/last.ckpt
"""
import sys

from core.trainer import main

if __name__ == "__main__":
    sys.exit(main())
