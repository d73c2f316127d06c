"""Images in steps: which images a step's prompt chunks need from the vision tower, and how long their embedding
rows stay in the runner's pool (executor/image_embeddings.py).

An image is encoded when the first chunk that runs any of its tokens is scheduled, and only then: an image whose
tokens the radix cache already holds (the same image after the same text, keyed by its content hash) never reaches
the tower. Its rows stay while its tokens still have to run (chunked prefill across an image takes several steps;
a preempted request keeps them for its return) and are freed once the chunk that runs its last token is launched,
or when the request ends. When the pool is full, a chunk stops before the image that does not fit; it runs once
the rows of earlier images are freed.
"""

from __future__ import annotations

import numpy as np

from sgjax.engine.request import Request
from sgjax.executor.model_runner import ModelRunner


class ImageSteps:
    def __init__(self, runner: ModelRunner):
        self.pool = runner.images
        self.encode = runner.encode_images  # the runner's: on several hosts, every host encodes
        self.holders: set[Request] = set()  # requests holding pool rows
        self.num_encoded = 0  # images run through the tower (tests check cache hits skip it)

    def prepare(self, batch: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """Encode the images the batch's chunks need and have no rows for; the batch, chunks cut where the pool
        is full (and dropped where nothing is left of them)."""
        for req in [r for r in self.holders if r.finished]:
            self._free(req, list(req.image_rows))
        encode, kept = [], []
        for req, n in batch:
            if req.images is not None:
                start = req.num_computed
                for i in req.images.images_in(start, start + n):
                    if i in req.image_rows:
                        continue
                    image = req.images.images[i]
                    rows = self.pool.alloc(image.num_tokens)
                    if rows is None:
                        n = image.offset - start
                        break
                    req.image_rows[i] = rows
                    self.holders.add(req)
                    encode.append((image.pixel_values, image.grid_thw, rows))
            if n > 0:
                kept.append((req, n))
        if encode:
            self.encode(encode)
            self.num_encoded += len(encode)
        return kept

    @staticmethod
    def chunk_rows(req: Request, n: int) -> np.ndarray:
        """Each of the next n tokens' row in the pool (-1: text)."""
        start = req.num_computed
        rows = np.full(n, -1, np.int32)
        for i in req.images.images_in(start, start + n):
            image = req.images.images[i]
            lo, hi = max(start, image.offset), min(start + n, image.end)
            rows[lo - start:hi - start] = req.image_rows[i][lo - image.offset:hi - image.offset]
        return rows

    def launched(self, req: Request) -> None:
        """After a chunk of `req` was launched: free the rows of images whose every token has run."""
        if req.image_rows:
            self._free(req, [i for i in req.image_rows if req.images.images[i].end <= req.num_computed])

    def _free(self, req: Request, images: list[int]) -> None:
        for i in images:
            self.pool.free(req.image_rows.pop(i))
        if not req.image_rows:
            self.holders.discard(req)
