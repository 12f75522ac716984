"""Prediction vs measurement (sim vs hw) and error bars: one configuration (single.py), the fixed suite and the
error distribution it measures (suite.py), the validation report (report.py).

Errors: step_error_pct = 100 · (predicted − measured) / measured; overhead_error_pts = predicted −
measured overhead, in percentage points; overhead = 100 · (step / full step − 1).
"""

from tiersim.validate.single import (
    BUSY_SHARE,
    SHAPE_KEYS,
    ValidateConfig,
    check_trace_spec,
    compare,
    default_profile,
    load_trace,
    measure,
    measure_watched,
    resolve_model,
    trace_model,
    validate,
)
from tiersim.validate.suite import (
    Suite,
    SuiteShape,
    error_table,
    run_suite,
    suite_for,
    suite_trace,
    summarize_errors,
    validation_table,
)

__all__ = ["BUSY_SHARE", "SHAPE_KEYS", "Suite", "SuiteShape", "ValidateConfig", "check_trace_spec", "compare",
           "default_profile", "error_table", "load_trace", "measure", "measure_watched", "resolve_model", "run_suite",
           "suite_for", "suite_trace", "summarize_errors", "trace_model", "validate", "validation_table"]
