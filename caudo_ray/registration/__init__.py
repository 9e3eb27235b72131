"""Registration of the labelled exemplars onto images, a label the segmenter did not draw."""

from caudo_ray.registration.exemplar import Registration, register_exemplars

__all__ = ["Registration", "register_exemplars"]
