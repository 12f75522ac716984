"""The batch-demand stage: tier schedules of the trace's requests (policy replay, cached) turned into
the per-step demand of a batch of slots — what the simulator (sim/) and the replay (hw/) both consume."""
