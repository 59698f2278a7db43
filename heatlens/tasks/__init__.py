"""Targets for tasks beyond classification: segmentation regions and detection boxes."""
