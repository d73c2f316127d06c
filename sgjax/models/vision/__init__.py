"""Vision towers: pixels in, embeddings the decoder splices in at its image placeholder tokens."""
