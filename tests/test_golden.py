"""Golden hashes: the bytes `foldkit fold` writes for the reference networks in models/ and for a
corpus of hand-built graphs, recorded so that a refactor can prove it changed no output.

Regenerate (only when an output is meant to change, and say why in the commit):
    FOLDKIT_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

import hashlib
import json
import os

import numpy as np
import onnx
import pytest

import foldkit

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_fold.json")
WRITE = os.environ.get("FOLDKIT_WRITE_GOLDEN") == "1"
NETWORKS = ("resnet18", "mobilenet_v2", "preact_resnet18", "unet", "audio_net", "video_net", "mlp_bn")


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _corpus():
    """Hand-built graphs (numpy's seeded generator: the same bytes on every machine)."""
    from tests.helpers import _classifier, _ill_conditioned, _mixconv, conv_bn_model, qconv, repvgg_block

    out = {f"conv_bn_group{g}": conv_bn_model(g) for g in (1, 2)}
    out["repvgg_identity_bn"] = repvgg_block()
    out["repvgg_depthwise"] = repvgg_block(group=8)
    out["mobileone_like"] = repvgg_block(extra_3x3=3, bias=True)
    out["repvgg_fp16"] = repvgg_block(dtype=np.float16)
    out["qdq_int8"] = qconv(negative=(1, 4))[0]
    out["qdq_per_tensor"] = qconv(per_channel=False)[0]
    out["qdq_float_weight"] = qconv(float_weight=np.linspace(-1, 1, 216, dtype=np.float32).reshape(6, 4, 3, 3),
                                    zp=np.zeros(6, np.int8))[0]
    out["mixconv"] = _mixconv("Conv")
    out["classifier"] = _classifier()
    out["ill_conditioned"] = _ill_conditioned()
    return out


def _fold_bytes(model) -> bytes:
    return foldkit.fold(model, verify=False).model.SerializeToString(deterministic=True)


def _load():
    if os.path.exists(GOLDEN):
        with open(GOLDEN) as f:
            return json.load(f)
    return {}


def test_hand_built_corpus_folds_to_the_recorded_bytes():
    golden = _load()
    got = {name: _sha(_fold_bytes(m)) for name, m in sorted(_corpus().items())}
    if WRITE:
        golden["corpus"] = got
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1, sort_keys=True)
    assert golden.get("corpus") == got


def test_reference_networks_fold_to_the_recorded_bytes(tmp_path):
    """Torch's weight initialization may differ across CPU instruction sets: a network whose export
    is not the recorded one is skipped (with its name), never compared."""
    pytest.importorskip("torch")
    import models
    from benchmarks.zoo import export

    golden = _load()
    recorded = golden.get("networks", {})
    got, differs = {}, []
    for name in NETWORKS:
        factory, shape = models.REGISTRY[name]
        path = tmp_path / f"{name}.onnx"
        export(factory(), shape, str(path))
        exported = path.read_bytes()
        folded = _fold_bytes(onnx.load_from_string(exported))
        got[name] = {"export": _sha(exported), "fold": _sha(folded)}
        if not WRITE and recorded.get(name, {}).get("export") != got[name]["export"]:
            differs.append(name)
    if WRITE:
        golden["networks"] = got
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1, sort_keys=True)
        return
    compared = [n for n in NETWORKS if n not in differs]
    assert {n: got[n]["fold"] for n in compared} == {n: recorded[n]["fold"] for n in compared}
    if differs:
        pytest.skip(f"exports differ from the recorded ones on this machine: {', '.join(differs)}")
