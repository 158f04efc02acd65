import numpy as np
import pytest

from hicache_core.keys import StorageNamespace, hash_chain, page_hash

# Vectors computed by hand from the definition: sha256(prior digest bytes || uint32-LE tokens).
H_1234 = "cf97adeedb59e05bfd73a2b4c2a8885708c4f4f70c84c64b27120e72ab733b72"
H_1234_5678 = "4ebfa8a1f3c341517621838c6e1b9aa350307e3f00b3cbd1a07ef740f54396d6"


def test_known_vectors():
    assert page_hash([1, 2, 3, 4]) == H_1234
    assert page_hash([5, 6, 7, 8], H_1234) == H_1234_5678
    assert page_hash([2**32 - 1]) == "ad95131bc0b799c0b1af477fb14fcf26a6a9f76079e48bf090acb7e8367bfd0e"


def test_chain_matches_independent_numpy_encoding():
    import hashlib

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 2**32, size=4 * 5 + 3, dtype=np.uint64).tolist()
    prior = None
    expected = []
    for i in range(5):
        h = hashlib.sha256()
        if prior:
            h.update(bytes.fromhex(prior))
        h.update(np.asarray(tokens[4 * i : 4 * i + 4], dtype="<u4").tobytes())
        prior = h.hexdigest()
        expected.append(prior)
    assert hash_chain(tokens, 4) == expected  # trailing partial page ignored
    # continuing a chain from the middle gives the same keys
    assert hash_chain(tokens[8:20], 4, prior_hash=expected[1]) == expected[2:]


def test_bad_tokens():
    with pytest.raises(ValueError, match="token ids"):
        page_hash([-1])


def test_namespace_separates_everything_that_changes_bytes():
    base = StorageNamespace(
        model="m",
        dtype="bfloat16",
        page_size=64,
        layout="layer_first",
        layer_num=4,
        head_num=8,
        head_dim=128,
        tp_size=2,
        tp_rank=0,
    )
    import attrs

    variants = [
        attrs.evolve(base, **{k: v})
        for k, v in [
            ("model", "m2"),
            ("dtype", "float16"),
            ("page_size", 32),
            ("layout", "page_first"),
            ("is_mla", True),
            ("layer_num", 5),
            ("head_num", 4),
            ("head_dim", 64),
            ("tp_size", 4),
            ("tp_rank", 1),
        ]
    ]
    tags = {v.tag for v in variants}
    assert base.tag not in tags and len(tags) == len(variants)
    # same page byte order -> same namespace
    assert attrs.evolve(base, layout="page_first_direct").tag == base.tag
    # MLA pages are the same on every rank
    mla = attrs.evolve(base, is_mla=True)
    assert attrs.evolve(mla, tp_rank=1).tag == mla.tag
    assert base.key("abc") == f"{base.tag}-abc"
