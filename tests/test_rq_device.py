"""rq encoding on a CUDA device (how ``cache_teacher`` runs it beside a GPU teacher) gives the
codes it gives on the CPU. Part of benchmarks/gpu_suite.sh; skipped without a GPU. No faiss
here: the GPU machine runs without it."""

import numpy as np
import pytest
import torch

from colld_ds.codecs import rq_decode, rq_encode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rq_encode_on_the_gpu_matches_the_cpu():
    rng = np.random.default_rng(0)
    codebook = (rng.standard_normal((8, 256, 64)) / np.arange(1, 9)[:, None, None] ** 0.5
                ).astype(np.float32)  # later stages smaller, as learned ones are
    x = rng.standard_normal((500, 64)).astype(np.float16)
    on_cpu = rq_encode(x, codebook)
    on_gpu = rq_encode(x, torch.from_numpy(codebook).cuda())
    assert on_gpu.dtype == np.uint8 and on_gpu.shape == (500, 8)
    assert (on_gpu == on_cpu).all(axis=1).mean() > 0.99  # float32 near-ties aside

    def error(codes):
        return float(((rq_decode(codes, codebook).astype(np.float32) - x) ** 2).sum())
    assert error(on_gpu) == pytest.approx(error(on_cpu), rel=1e-3)
