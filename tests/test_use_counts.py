"""Use counts have one source of truth: ``ModelIndex.uses``, kept by every GraphView edit. The
autouse fixture in conftest recounts them after every pass of every fold in the suite; these tests
show that the recount catches a drift, and that cleanup relies on the kept count alone."""

import numpy as np
import pytest
import onnx
from onnx import helper

import foldkit
from foldkit.graph import ModelIndex
from tests.helpers import F32, UseCountDrift, conv_bn_model, fold_and_compare, make_model, tensor


def test_a_forgotten_count_is_caught(monkeypatch):
    """An edit that forgets to uncount the names a removed node read: the recount after the pass
    says so (cleanup would otherwise keep the BN parameters, or with the opposite drift remove a
    tensor still read)."""
    monkeypatch.setattr(ModelIndex, "unuse", lambda self, name: None)
    with pytest.raises(UseCountDrift, match="kept 1, real 0"):
        foldkit.fold(conv_bn_model(), verify=False)


def test_a_shared_weight_survives_cleanup_with_the_kept_count():
    """W feeds two Convs, one followed by a BN: the fold clones W for that Conv; cleanup, using
    the kept count, must keep W for the other Conv, and the model must still run the same."""
    r = np.random.default_rng(4)
    w = r.standard_normal((6, 4, 3, 3)).astype(np.float32)
    bn = [tensor(f"bn{k}", a.astype(np.float32)) for k, a in
          enumerate([r.normal(1, .2, 6), r.normal(0, .3, 6), r.normal(0, .3, 6), r.uniform(.5, 2, 6)])]
    nodes = [helper.make_node("Conv", ["X", "W"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "bn0", "bn1", "bn2", "bn3"], ["Y"]),
             helper.make_node("Conv", ["X", "W"], ["Z"], pads=[1, 1, 1, 1])]
    m = make_model(nodes, [("X", F32, [1, 4, 5, 5])], [("Y", F32, None), ("Z", F32, None)], [tensor("W", w)] + bn)
    folded = fold_and_compare(m)
    names = {t.name for t in folded.model.graph.initializer}
    assert "W" in names and not names & {"bn0", "bn1", "bn2", "bn3"}


def test_the_consumers_index_follows_every_edit():
    """GraphView keeps its consumers index through its edits (set_input, rewrite_node,
    set_constant under a fresh name, remove) instead of rebuilding it: after each edit every name
    gives what a rebuild gives, in the same order (conftest's autouse check compares each lookup)."""
    from foldkit.graph import GraphView

    w = np.ones((2, 2, 1, 1), np.float32)
    nodes = [helper.make_node("Conv", ["X", "W"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Conv", ["c", "W"], ["Y"])]
    m = make_model(nodes, [("X", F32, [1, 2, 3, 3])], [("Y", F32, None)], [tensor("W", w)])
    view = GraphView(m.graph, ModelIndex(m))
    names = ["X", "W", "a", "b", "c", "Y"]

    def lookups():
        return {n: view.consumers(n) for n in names + [k for k in view.inits if k not in names]}

    assert lookups()["a"] == [(1, 0), (2, 0)]
    view.set_input(2, 0, "X")  # Add(X, b)
    assert lookups()["X"] == [(0, 0), (2, 0)] and lookups()["a"] == [(1, 0)]
    view.rewrite_node(1, "Mul", ["X", "a"])  # b = X * a, read before the Add that now reads X
    assert lookups()["X"] == [(0, 0), (1, 0), (2, 0)] and lookups()["a"] == [(1, 1)]
    new = view.set_constant(3, 1, 2 * w, onnx.TensorProto.FLOAT, "W")  # W is shared: a fresh name
    assert new != "W" and lookups()["W"] == [(0, 1)] and lookups()[new] == [(3, 1)]
    view.remove(2)
    assert lookups()["b"] == [] and lookups()["c"] == [(3, 0)]
