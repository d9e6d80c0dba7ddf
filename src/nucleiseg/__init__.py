"""nucleiseg: nucleus instance segmentation for microscopy images.

>>> import nucleiseg
>>> model = nucleiseg.load()            # the bundled default model, or nucleiseg.load("path/to/model")
>>> labels = model.predict(image)       # (H, W) int32 instance labels
"""
__version__ = "0.1.0"

from .model import Model, load  # noqa: E402

__all__ = ["Model", "load", "__version__"]
