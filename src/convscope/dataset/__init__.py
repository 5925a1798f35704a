"""Dataset-scale analyses: streaming runs of a model over many images.

- :mod:`.bias`: shape-versus-texture bias on cue-conflict images (Geirhos et al., ICLR 2019) and
  shape-only accuracy on silhouettes and edge drawings.
- :mod:`.topk`: the images and patches that most activate each channel of a layer, streamed with memory
  bounded by channels x k, saved as it goes and resumable.

Each module's public names are re-exported here.
"""

from __future__ import annotations

from .bias import (
    PUBLISHED_SHAPE_ACCURACY,
    PUBLISHED_SHAPE_BIAS,
    CategoryCounts,
    Decision,
    ShapeAccuracy,
    ShapeBias,
    StimuliError,
    aggregation_matrix,
    category_scores,
    find_stimuli,
    load_categories,
    shape_accuracy,
    shape_bias,
)
from .folder import DatasetError, ImageSource, SkippedImagesWarning, list_images
from .topk import Hit, StateMismatchError, TopK, TopKError, top_activations

__all__ = [
    "PUBLISHED_SHAPE_ACCURACY",
    "PUBLISHED_SHAPE_BIAS",
    "CategoryCounts",
    "DatasetError",
    "Decision",
    "Hit",
    "ImageSource",
    "ShapeAccuracy",
    "ShapeBias",
    "SkippedImagesWarning",
    "StateMismatchError",
    "StimuliError",
    "TopK",
    "TopKError",
    "aggregation_matrix",
    "category_scores",
    "find_stimuli",
    "list_images",
    "load_categories",
    "shape_accuracy",
    "shape_bias",
    "top_activations",
]
