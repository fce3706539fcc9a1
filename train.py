"""Train SepViT: `python train.py` trains the digits default (>= 0.98 test accuracy).

See `python train.py --help` and `sepvit_jax.train.config.TrainConfig` for every setting.
"""

from sepvit_jax.train.run import exit_now, main

if __name__ == "__main__":
    exit_now(main())
