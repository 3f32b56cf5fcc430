"""Text + images -> token ids + tensors."""

from phi3v.processing.chat import PromptError, render_chat, tokenize_prompt
from phi3v.processing.image import ImageBatch, ImageProcessor, ProcessedImage
from phi3v.processing.image_io import ImageInputError, load_image
from phi3v.processing.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["ImageBatch", "ImageInputError", "ImageProcessor", "IncrementalDetokenizer", "ProcessedImage", "PromptError",
           "Tokenizer", "load_image", "render_chat", "tokenize_prompt"]
