"""Use counts have one source of truth: ``ModelIndex.uses``, kept by every GraphView edit. The
autouse fixture in conftest recounts them after every pass of every fold in the suite; these tests
show that the recount catches a drift, and that cleanup relies on the kept count alone."""

import numpy as np
import pytest
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
