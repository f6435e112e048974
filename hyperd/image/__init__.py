"""The guest image of the qemu backend: ``hyperd image build`` (see :mod:`hyperd.image.build`)."""

from hyperd.image.build import ImageResult, build_image, default_cache_dir, image_paths
from hyperd.image.errors import ImageError

__all__ = ["ImageError", "ImageResult", "build_image", "default_cache_dir", "image_paths"]
