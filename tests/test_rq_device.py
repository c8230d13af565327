"""rq encoding on a CUDA device (how ``cache_teacher`` runs it beside a GPU teacher) gives the
codes it gives on the CPU, and pq and rq codes decoded there (``data.decode_codes device``) the
loader's targets. Part of benchmarks/gpu_suite.sh; skipped without a GPU. No faiss here: the GPU
machine runs without it."""

import numpy as np
import pytest
import torch

from colld_ds.codecs import CodeDecoder, decode, rq_decode, rq_encode


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("codec", ["pq", "rq"])
def test_codes_decoded_on_the_gpu_are_the_loaders(codec):
    """``data.decode_codes device`` on a GPU: ``CodeDecoder`` there gives what the loader's
    numpy decode gives (up to float16 rounding of another summation order), zero at padding."""
    rng = np.random.default_rng(1)
    num_codebooks, width = 16, 64
    sub = width // num_codebooks if codec == "pq" else width
    books = rng.standard_normal((2, num_codebooks, 256, sub)).astype(np.float32)  # 2 layers
    codes = rng.integers(0, 256, (2, 3, 40, num_codebooks), dtype=np.uint8)  # (L, B, T, M)
    lengths = torch.tensor([40, 25, 1])
    decoded = CodeDecoder(codec, books, "cuda")([torch.from_numpy(c).cuda() for c in codes],
                                                lengths)
    for layer, features in enumerate(decoded):
        assert features.device.type == "cuda" and features.dtype == torch.float16
        for row, length in enumerate(lengths.tolist()):
            loader = decode([codes[layer, row, :length]], codec, books[layer])
            torch.testing.assert_close(features[row, :length].cpu(), torch.from_numpy(loader),
                                       rtol=2**-10, atol=2**-8)
            assert not features[row, length:].any()
