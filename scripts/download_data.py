#!/usr/bin/env python3
"""Downloads the real CMS jet HDF5 files into ``--data-dir`` (default ``data``), resumably.

  python scripts/download_data.py                    # both files: 4.66 GiB labelled + 27.94 GiB unlabelled
  python scripts/download_data.py --labelled-only    # enough for training from scratch and evaluation

Interrupted downloads resume from ``<file>.part`` when the same command is run again. The logic lives in
``l2vit_jax/data/download.py``.
"""

import sys


from l2vit_jax.data import download

if __name__ == "__main__":
  sys.exit(download.main())
