"""Text + images -> token ids + tensors."""

from phi3v.processing.image import ImageProcessor, ProcessedImage

__all__ = ["ImageProcessor", "ProcessedImage"]
