"""Medical data layer: readers, preprocessing, datasets, splits, the built-in cohort."""

from medgen.data.dataset import (
    ImageSet,
    MedicalDataset,
    Sample,
    check_samples,
    content_sha256,
    datasets_from_config,
    iter_images,
    load_images,
    load_split,
    make_splits,
    save_split,
    scan_dataset,
    split_content_mismatch,
)
from medgen.data.preprocess import DataConfig, preprocess
from medgen.data.readers import Loaded, load, read_image

__all__ = [
    "DataConfig",
    "ImageSet",
    "Loaded",
    "MedicalDataset",
    "Sample",
    "check_samples",
    "content_sha256",
    "datasets_from_config",
    "iter_images",
    "load",
    "load_images",
    "load_split",
    "make_splits",
    "preprocess",
    "read_image",
    "save_split",
    "scan_dataset",
    "split_content_mismatch",
]
