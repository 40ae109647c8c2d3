"""Detection logic on per-row score arrays: coarse split, seed selection, fine-stage scores, thresholds,
baselines and metrics. Nothing here reads a store or knows about the CLI."""
