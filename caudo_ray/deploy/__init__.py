"""Models that leave caudo-ray: the final segmenter with its preprocessing, as an MLflow Model and a MONAI bundle.

Importing this package imports nothing heavy; each module is imported where it is used.
"""
