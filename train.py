"""Train SepViT: `python train.py` trains the digits default (>= 0.98 test accuracy).

See `python train.py --help` and `sepvit_jax.train.config.TrainConfig` for every setting.
"""

import sys

from sepvit_jax.train.run import main

if __name__ == "__main__":
    sys.exit(main())
