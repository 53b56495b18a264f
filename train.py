"""Train a pyramid aligner stage by stage. See `python train.py --help` and metroem/training/cli.py.

    python train.py --pyramid_path ~/model/m4m6m8 --dataset_path ~/data \
        --train_mode scratch --train_stages 1 --generate_field_stages 1 \
        --checkpoint_name precomputed --no_redirect_stdout
"""

import sys

from metroem.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
