"""Performance accounting: the analytic per-step cost model (:mod:`.cost_model`)."""
