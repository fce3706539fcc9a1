"""Train SepViT: `python train.py` trains the digits default (>= 0.98 test accuracy).

The same program as the `sepvit-train` console script; see `python train.py --help` and
`sepvit_jax.train.config.TrainConfig` for every setting.
"""

from sepvit_jax.train.entry import main

if __name__ == "__main__":
    main()
