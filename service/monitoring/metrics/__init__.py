"""Pure numpy metric layer: each statistic a function, each with a mergeable streaming twin.

Every `*Stats` class holds sufficient statistics (counts and sums) that a database layer
fills from SQL aggregates (GROUP BY sums and per-bin counts), that `merge` exactly across
workers, replicas and windows, that `from_arrays` builds from raw rows, and whose `result`
returns a `MetricValue`. No HTTP, SQL, Prometheus or torch here (METRICS.md is the spec).
"""

from service.monitoring.metrics.calibration import (
    CELLS,
    ECE_BINS,
    CalibrationStats,
    LabelColumns,
    confidence_bin,
    confidence_fine_bin,
    debiased_rms_calibration_error,
    ece_bootstrap_interval,
    ece_null_quantile,
    equal_mass_cells,
    expected_calibration_error,
    label_columns,
    miscalibrated,
)
from service.monitoring.metrics.drift import (
    ENTROPY_BINS,
    FINE_BINS,
    DriftStats,
    EntropyReference,
    fine_index,
    js_divergence,
    smoothed_shares,
    wasserstein_fine,
)
from service.monitoring.metrics.flip import (
    DECILES,
    FlipColumns,
    FlipStats,
    confidence_decile,
    flip_columns,
    inverse_inclusion_weights,
)
from service.monitoring.metrics.gap import (
    DEFAULT_GAP,
    GapStats,
    TeacherGapStats,
    gap_residual,
    teacher_gap_delta,
)
from service.monitoring.metrics.intervals import (
    clopper_pearson,
    effective_sample_size,
    mcnemar_exact,
    newcombe_paired_difference,
    proportion_interval,
    wald_paired_difference,
    wilson,
)
from service.monitoring.metrics.values import MetricValue, State

__all__ = [
    "CELLS",
    "DECILES",
    "DEFAULT_GAP",
    "ECE_BINS",
    "ENTROPY_BINS",
    "FINE_BINS",
    "CalibrationStats",
    "DriftStats",
    "EntropyReference",
    "FlipColumns",
    "FlipStats",
    "GapStats",
    "LabelColumns",
    "MetricValue",
    "State",
    "TeacherGapStats",
    "clopper_pearson",
    "confidence_bin",
    "confidence_decile",
    "confidence_fine_bin",
    "debiased_rms_calibration_error",
    "ece_bootstrap_interval",
    "ece_null_quantile",
    "effective_sample_size",
    "equal_mass_cells",
    "expected_calibration_error",
    "fine_index",
    "flip_columns",
    "gap_residual",
    "inverse_inclusion_weights",
    "js_divergence",
    "label_columns",
    "mcnemar_exact",
    "miscalibrated",
    "newcombe_paired_difference",
    "proportion_interval",
    "smoothed_shares",
    "teacher_gap_delta",
    "wald_paired_difference",
    "wasserstein_fine",
    "wilson",
]
