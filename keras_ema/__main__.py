"""`python -m keras_ema`: the `keras-ema` command line."""

import sys

from keras_ema.cli import main

sys.exit(main())
