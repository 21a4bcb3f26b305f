"""Model passes: torch.fx tracing, the layer policy, the keep and expand conversions, BatchNorm
recalibration and folding, and `convert()` that picks the pass (docs/design.md section 2)."""
