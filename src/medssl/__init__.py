"""medssl: self-supervised pretraining and low-label fine-tuning for medical image segmentation."""

__version__ = "0.1.0"
