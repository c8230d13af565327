"""Teachers, students and span masking for CoLLD (see families.py for per-family knowledge)."""

from colld_ds.models.families import FAMILIES, Family, family_of, frame_mask
from colld_ds.models.masking import (
    compute_span_mask,
    expected_masked_fraction,
    utterance_span_masks,
)
from colld_ds.models.student import Student, StudentOutput, build_student
from colld_ds.models.teacher import (
    Teacher,
    TeacherOutput,
    config_hash,
    load_teacher,
    read_num_layers,
)

__all__ = [
    "FAMILIES",
    "Family",
    "Student",
    "StudentOutput",
    "Teacher",
    "TeacherOutput",
    "build_student",
    "compute_span_mask",
    "utterance_span_masks",
    "config_hash",
    "expected_masked_fraction",
    "family_of",
    "frame_mask",
    "load_teacher",
    "read_num_layers",
]
