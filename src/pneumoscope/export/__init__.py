"""Packaging a trained model for deployment: ONNX (:mod:`pneumoscope.export.onnx`)."""
