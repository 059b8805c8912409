"""Unit tests: one module at a time, in-process (real ONNX models, real files)."""
