"""Evaluations of a pretrained backbone, following DINO's protocols.

* :func:`knn_classify`: weighted k-NN classification on frozen features;
* :func:`train_linear_classifier` / :func:`linear_probe`: linear evaluation;
* :func:`evaluate_copy_detection`: Copydays "strong" copy detection;
* :func:`compute_map` / :func:`evaluate_retrieval`: revisited Oxford/Paris retrieval;
* :func:`correspondence_recall`: do patch tokens find their geometric match in another
  view (with the :class:`PositionOnly` baseline)?

The command-line front end is ``python -m pwself_reference.eval {knn,linear,copydays,retrieval}``.
"""

from pwself_reference.evaluation.copy_detection import (
    COPYDAYS_BLOCKS,
    CopydaysBenchmark,
    ImageListDataset,
    evaluate_copy_detection,
    list_images,
    score_copy_detection,
)
from pwself_reference.evaluation.correspondence import (
    PositionOnly,
    correspondence_recall,
    token_match_hits,
)
from pwself_reference.evaluation.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    cls_features,
    crop_to_patch_multiple,
    eval_transform,
    extract_features,
    gem_features,
    last_blocks_features,
    multiscale_features,
)
from pwself_reference.evaluation.knn import knn_classify
from pwself_reference.evaluation.linear_probe import (
    LinearClassifier,
    linear_probe,
    train_linear_classifier,
)
from pwself_reference.evaluation.retrieval import (
    RevisitedDataset,
    average_precision,
    compute_map,
    evaluate_retrieval,
    gnd_easy,
    gnd_hard,
    gnd_medium,
    load_gnd,
    retrieval_ranks,
)
from pwself_reference.evaluation.whitening import Whitening, learn_whitening

__all__ = [
    "COPYDAYS_BLOCKS",
    "CopydaysBenchmark",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageListDataset",
    "LinearClassifier",
    "PositionOnly",
    "RevisitedDataset",
    "Whitening",
    "average_precision",
    "cls_features",
    "compute_map",
    "correspondence_recall",
    "crop_to_patch_multiple",
    "eval_transform",
    "evaluate_copy_detection",
    "evaluate_retrieval",
    "extract_features",
    "gem_features",
    "gnd_easy",
    "gnd_hard",
    "gnd_medium",
    "knn_classify",
    "last_blocks_features",
    "learn_whitening",
    "linear_probe",
    "list_images",
    "load_gnd",
    "multiscale_features",
    "retrieval_ranks",
    "score_copy_detection",
    "token_match_hits",
    "train_linear_classifier",
]
