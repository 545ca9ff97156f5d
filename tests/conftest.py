import os
import sys

import onnx
import pytest
from hypothesis import settings

# CI runs are derandomized so that a red build is reproducible; locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def conv_bn_path(tmp_path):
    from tests.helpers import conv_bn_model

    p = tmp_path / "model.onnx"
    onnx.save(conv_bn_model(2, group=2), str(p))
    return p
