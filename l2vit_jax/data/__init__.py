"""Data: HDF5 files, synthetic CMS-like jets, splits, augmentations and Grain pipelines."""
