"""Small helpers shared by the data-loader tests."""

import itertools


def take(stream, n):
    """The first n batches of an `AudioBatchStream` (a fresh iterator)."""
    return list(itertools.islice(iter(stream), n))


def keys_of(batches):
    """Sample keys of batches, in order."""
    return [k for b in batches for k in b.keys]
