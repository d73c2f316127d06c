"""Inputs other than text: image loading, model-specific image preprocessing, multimodal positions (host-side,
numpy and pillow only)."""
