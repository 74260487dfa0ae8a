"""Conformance tests a plugin runs against its own implementation.

Each class is a set of pytest tests for one plugin kind. A plugin's test module
subclasses it (the subclass name must start with ``Test`` so pytest collects it)
and provides one fixture::

    from kv3d_core.testing import CodecContract

    class TestMyCodec(CodecContract):
        max_rel_error = 0.01          # optional: the codec's stated error bound

        @pytest.fixture
        def codec(self):
            return MyCodec()

- :class:`CodecContract`    -- fixture ``codec``: a :class:`~kv3d_core.contracts.DeltaCodec`
- :class:`TierContract`     -- fixture ``tier``: a fresh, unbound :class:`~kv3d_core.contracts.StorageTier`
  with a small capacity; hooks ``reopen`` (persistent tiers) and ``damage``
- :class:`DetectorContract` -- fixture ``detector``: a :class:`~kv3d_core.contracts.PrefixDetector`
- :class:`StateLayoutContract` -- fixtures ``layout`` (a backend's
  :class:`~kv3d_core.contracts.StateLayout`) and ``blob`` (one of its state blobs)

:class:`FakeBackend` is no contract suite: an in-memory :class:`~kv3d_core.contracts.ExecutionBackend`
(synthetic K/V and logits, state blobs of its own :class:`~kv3d_core.testing.state_layout.RowsLayout`) on which the prefix cache, the tiers and the
scheduler run without a model, in milliseconds (:mod:`kv3d_core.testing.backend`).

Class attributes state the documented choices the contract cannot guess (error bound,
handling of inf/NaN, whether damage is detected); each class's docstring lists them.
This package imports pytest; the rest of ``kv3d_core`` never imports it.
"""

import pytest

# plain ``assert`` in the contract modules gets pytest's detailed failure messages
pytest.register_assert_rewrite("kv3d_core.testing.codec", "kv3d_core.testing.tier",
                               "kv3d_core.testing.detector", "kv3d_core.testing.state")

from kv3d_core.testing.backend import FakeBackend  # noqa: E402
from kv3d_core.testing.codec import CodecContract, kv_cases  # noqa: E402
from kv3d_core.testing.detector import DetectorContract  # noqa: E402
from kv3d_core.testing.state import StateLayoutContract  # noqa: E402
from kv3d_core.testing.tier import TierContract  # noqa: E402

__all__ = ["CodecContract", "DetectorContract", "FakeBackend", "StateLayoutContract", "TierContract", "kv_cases"]
