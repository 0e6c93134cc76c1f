"""kaggle_seg: Kaggle medical-image segmentation, raw competition files to a scored submission."""

__version__ = "0.1.0"
