"""The one error of the image build."""

from __future__ import annotations

__all__ = ["ImageError"]


class ImageError(Exception):
    """The guest image cannot be built; the message says what is missing or wrong."""
