import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the dynq package of this source tree


def pytest_report_header(config):
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except Exception:  # pragma: no cover
        ort = "not installed"
    import dynq

    return [f"dynq library: {dynq.library_path()} ({dynq.version()}, kernel {dynq.active_isa()}); onnxruntime {ort}"]


@pytest.fixture(scope="session")
def lib_path():
    import dynq

    return dynq.library_path()
