"""File formats: atomic writes, the checkpoint (.pt), the packed 1-bit file (.mcn), ONNX, and
the one strict `load()` (docs/design.md section 4)."""
