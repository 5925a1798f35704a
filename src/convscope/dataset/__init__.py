"""Dataset-scale analyses: streaming runs of a model over many images.

- :mod:`.bias`: shape-versus-texture bias on cue-conflict images (Geirhos et al., ICLR 2019) and
  shape-only accuracy on silhouettes and edge drawings.
- :mod:`.topk`: the images and patches that most activate each channel of a layer, streamed with memory
  bounded by channels x k, saved as it goes and resumable; channels that never fire.
- :mod:`.dissect`: Network Dissection (Bau et al. 2017) against a Broden-format concept dataset.
- :mod:`.net2vec`: Net2Vec (Fong & Vedaldi 2018): concepts learned as weighted sets of a layer's channels,
  against the best single unit.
- :mod:`.embed`: one pooled feature vector per image; nearest neighbours; PCA, t-SNE and UMAP maps.
- :mod:`.maps`: FAISS neighbour indexes (exact flat, approximate IVF / HNSW; :func:`knn` for every row at
  once), PCA, t-SNE (openTSNE) and UMAP (umap-learn), and the size limits checked before work.
- :mod:`.evolution`: how filters and representations change across training checkpoints (weight drift,
  filter cosine, linear CKA to the final checkpoint).
- :mod:`.engine`: the one streaming runner (:func:`run`) every analysis above runs on: reducers
  (:class:`Reducer`; :class:`ChannelStats` here, :class:`TopKReducer` in :mod:`.topk`) share one forward pass,
  parallel decoding, atomic resumable states (:class:`StateStore`), local or Ray engines.
- :mod:`.folder`: streaming image folders, lists and tensors in batches; the options every run takes
  (``BATCH_SIZE``, ``SAVE_EVERY``), saved run states and their errors (:class:`StateFileError`,
  :class:`StateMismatchError`, shared by every resumable analysis), :class:`UnreadableImagesError`.
- :mod:`.projection`: DeconvNet (or guided / plain gradient) projections of single top units back to
  pixels, batched (Zeiler & Fergus 2014, fig. 2).

Each module's public names are re-exported here.
"""

from __future__ import annotations

from .bias import (
    PUBLISHED_SHAPE_ACCURACY,
    PUBLISHED_SHAPE_BIAS,
    CategoryCounts,
    CategoryScores,
    Decision,
    ShapeAccuracy,
    ShapeBias,
    StimuliError,
    StimuliRun,
    aggregation_matrix,
    category_scores,
    find_stimuli,
    load_categories,
    shape_accuracy,
    shape_bias,
    stimuli_state,
)
from .dissect import (
    Broden,
    DissectError,
    Dissection,
    IoUReducer,
    ThresholdReducer,
    Unit,
    dissect,
    make_synthetic_broden,
    open_broden,
)
from .embed import (
    Embedding,
    EmbeddingError,
    EmbeddingReducer,
    Neighbour,
    embed,
    feature_distances,
    load_embedding,
    pca,
    tsne,
    umap_projection,
)
from .engine import (
    ChannelStats,
    EngineError,
    Forward,
    Preprocessing,
    Reducer,
    Remapped,
    Run,
    RunInfo,
    StateStore,
    Stats,
    run,
)
from .evolution import (
    Evolution,
    EvolutionError,
    ProbeFeatures,
    centered_gram,
    checkpoint_identity,
    evolution,
    gram_cka,
    linear_cka,
)
from .folder import (
    DatasetError,
    ImageSource,
    SkippedImagesWarning,
    StateFileError,
    StateMismatchError,
    TensorSource,
    UnreadableImagesError,
    list_images,
    open_images,
)
from .maps import NeighbourIndex, build_index, check_map_size, knn
from .net2vec import ConceptVector, Net2Vec, average_precision, net2vec
from .projection import ProjectionError, Projections, UnitGradients, projection_picture, unit_gradients
from .topk import Hit, TopK, TopKError, TopKReducer, top_activations

__all__ = [
    "Remapped",
    "CategoryScores",
    "ProbeFeatures",
    "checkpoint_identity",
    "stimuli_state",
    "IoUReducer",
    "ThresholdReducer",
    "ChannelStats",
    "EngineError",
    "Forward",
    "Preprocessing",
    "Reducer",
    "Run",
    "RunInfo",
    "StateStore",
    "Stats",
    "TopKReducer",
    "run",
    "ConceptVector",
    "Net2Vec",
    "average_precision",
    "net2vec",
    "PUBLISHED_SHAPE_ACCURACY",
    "PUBLISHED_SHAPE_BIAS",
    "ProjectionError",
    "Projections",
    "UnitGradients",
    "projection_picture",
    "unit_gradients",
    "Broden",
    "CategoryCounts",
    "DatasetError",
    "Decision",
    "DissectError",
    "Dissection",
    "Embedding",
    "EmbeddingError",
    "EmbeddingReducer",
    "Evolution",
    "EvolutionError",
    "Neighbour",
    "Hit",
    "ImageSource",
    "ShapeAccuracy",
    "ShapeBias",
    "SkippedImagesWarning",
    "StateFileError",
    "StateMismatchError",
    "StimuliError",
    "StimuliRun",
    "UnreadableImagesError",
    "TopK",
    "TopKError",
    "Unit",
    "TensorSource",
    "aggregation_matrix",
    "centered_gram",
    "dissect",
    "embed",
    "evolution",
    "feature_distances",
    "build_index",
    "check_map_size",
    "knn",
    "NeighbourIndex",
    "load_embedding",
    "make_synthetic_broden",
    "open_broden",
    "open_images",
    "pca",
    "tsne",
    "umap_projection",
    "category_scores",
    "find_stimuli",
    "gram_cka",
    "linear_cka",
    "list_images",
    "load_categories",
    "shape_accuracy",
    "shape_bias",
    "top_activations",
]
