"""Wire formats: the Open Inference Protocol (V2) models and tensor codec, the simple REST API."""
