"""Data: manifest parsers, validator, clip datasets, clip transforms and heterogeneous pairing.

The synthetic benchmark lives in :mod:`facelayers.data.synthetic` (import it explicitly).
"""

from __future__ import annotations

from .datasets import (
    check_frame_counts,
    IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, AUClipDataset, AUWindow, ExpressionClipDataset,
    FrameCountMismatchError, au_windows, decode_video_frames, list_frame_files, load_frame,
    natural_sort_key, read_video_frames, segment_indices, split_runs, video_frame_count,
    full_windows, release_segment_indices, WindowPlanner, FrameSampler,
)
from .loader import (
    HeterogeneousLoader, few_shot_indices, fraction_indices, fraction_subset, subject_split, without_classes_indices,
)
from .manifests import (
    FORMATS, SPLITS, AURecord, ExpressionRecord, ManifestError, ManifestFormat, ManifestIssue,
    Split, get_format, get_split, group_by_subject, iter_manifest, list_splits, parse_frame_index,
    parse_subject, read_manifest, write_manifest,
)
from .transforms import (
    CLIP_MEAN, CLIP_STD, DRAFT_MEAN_ATOL, FAST_PATH_ATOL, JPEG_DRAFT_MARGIN, ClipCenterCrop,
    ClipColorJitter, ClipCompose, ClipNormalize, ClipRandomErasing, ClipRandomHorizontalFlip,
    ClipRandomResizedCrop, ClipResize, ClipTransform, FrameSizeMismatchError, FrameSource,
    eval_transform, load_frame_uint8, train_transform,
)
from .validate import ISSUE_KINDS, ManifestValidationError, ValidationIssue, ValidationReport, validate_manifest

__all__ = [
    "check_frame_counts",
    "few_shot_indices", "without_classes_indices",
    "full_windows", "release_segment_indices", "WindowPlanner", "FrameSampler",
    "decode_video_frames", "video_frame_count", "load_frame_uint8", "FrameSizeMismatchError",
    "FrameSource", "FAST_PATH_ATOL", "DRAFT_MEAN_ATOL", "JPEG_DRAFT_MARGIN", "AURecord",
    "AUClipDataset", "AUWindow", "CLIP_MEAN", "CLIP_STD", "ClipCenterCrop", "ClipColorJitter",
    "ClipCompose", "ClipNormalize", "ClipRandomErasing", "ClipRandomHorizontalFlip",
    "ClipRandomResizedCrop", "ClipResize", "ClipTransform", "ExpressionClipDataset",
    "ExpressionRecord", "FORMATS", "FrameCountMismatchError", "HeterogeneousLoader",
    "IMAGE_EXTENSIONS", "ISSUE_KINDS", "ManifestError", "ManifestFormat", "ManifestIssue",
    "ManifestValidationError", "SPLITS", "Split", "VIDEO_EXTENSIONS", "ValidationIssue",
    "ValidationReport", "au_windows", "eval_transform", "fraction_indices", "fraction_subset",
    "get_format", "get_split", "group_by_subject", "iter_manifest", "list_frame_files",
    "list_splits", "load_frame", "natural_sort_key", "parse_frame_index", "parse_subject",
    "read_manifest", "read_video_frames", "segment_indices", "split_runs", "subject_split",
    "train_transform", "validate_manifest", "write_manifest",
]
