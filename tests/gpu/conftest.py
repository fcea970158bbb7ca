"""GPU tests: skipped as a whole when there is no CUDA GPU or rtllm was built without the CUDA backend."""
import pytest

torch = pytest.importorskip("torch")


def _kernels_module():
    try:
        from rtllm import _core
    except ImportError:
        import _core  # a development build on PYTHONPATH
    return getattr(_core, "kernels", None)


def pytest_collection_modifyitems(config, items):
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA GPU"
    elif _kernels_module() is None:
        reason = "rtllm was built without the CUDA backend"
    if reason:
        for item in items:
            if "tests/gpu" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def kernels():
    return _kernels_module()


@pytest.fixture
def stream():
    return torch.cuda.current_stream().cuda_stream
