"""Studies built on the simulator: sweeps (local or Dask), the β/strategy search, scaling, reports and plots."""
