"""Obstacle sets: embeddings of what the sampler must avoid, indexed with FAISS, saved safely."""

from cspace.io.names import check_import_name

check_import_name("obstacles", __file__)  # another distribution of that name: stop here

from obstacles.classifier import ClassifierError, PreferenceClassifier
from obstacles.from_images import add_images, build_from_images, classifier_from_images
from obstacles.kernel_region import KernelRegion
from obstacles.obstacle_set import (
    FORMAT,
    FORMAT_VERSION,
    ObstacleSet,
    ObstacleSetError,
    is_obstacle_set,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ClassifierError",
    "KernelRegion",
    "ObstacleSet",
    "ObstacleSetError",
    "PreferenceClassifier",
    "add_images",
    "build_from_images",
    "classifier_from_images",
    "is_obstacle_set",
]
