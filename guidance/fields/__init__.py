"""The fields: the repulsive field of obstacle sets, the field of a preference classifier, sums of
fields, and the base they share (:mod:`.base`)."""

from guidance.fields.base import Field, FieldOutput, safe_norm
from guidance.fields.classifier import ClassifierField
from guidance.fields.combined import CombinedField
from guidance.fields.repulsive import RepulsiveField

__all__ = [
    "ClassifierField",
    "CombinedField",
    "Field",
    "FieldOutput",
    "RepulsiveField",
    "safe_norm",
]
