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


@pytest.fixture(autouse=True)
def _recount_uses_after_every_pass(monkeypatch):
    """Every fold any test runs in this process checks, after each pass, that the use counts the
    passes kept equal a recount of the model (foldkit keeps one count; cleanup trusts it)."""
    import foldkit.api as api
    from tests.helpers import Recounting

    select = api._select
    monkeypatch.setattr(api, "_select", lambda passes, skip: [Recounting(p) for p in select(passes, skip)])


@pytest.fixture(autouse=True)
def _consumers_index_matches_a_rebuild(monkeypatch):
    """GraphView keeps its consumers index up to date through its edits instead of rebuilding it
    after each one: every lookup any test makes checks that the kept index equals a rebuild
    (entries, and their order, which decides the order rewrites happen in)."""
    from foldkit.graph import GraphView

    kept = GraphView.consumers

    def checked(self, name):
        got = kept(self, name)
        rebuilt = [(i, p) for i, node in enumerate(self.nodes) if i not in self.removed
                   for p, inp in enumerate(node.input) if inp and inp == name]
        assert got == rebuilt, f"consumers index of {name!r}: kept {got}, rebuilt {rebuilt}"
        return got
    monkeypatch.setattr(GraphView, "consumers", checked)
