"""A corpus of hostile but possible inputs, each written into a folder by a builder.

Every builder takes the folder and returns the model's path. The models are small; each one is
the smallest instance of a way real files go wrong (or of a valid model that is merely unusual).
Used by tests/test_hostile.py, which runs every command on every case and checks one property.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import F32, bn_inits, make_model, rng, tensor

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def base_model(c_in=4, c_out=8, k=3, names=None):
    """Conv (a 1,152-byte weight: big enough to be read lazily) -> BN."""
    r = rng(0)
    names = names or {}
    w = r.standard_normal((c_out, c_in, k, k)).astype(np.float32)
    bn_names, bn = bn_inits("bn", c_out, r)
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], name=names.get("conv", "conv"), pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c"] + bn_names, ["Y"], name=names.get("bn", "bn"), epsilon=1e-3)]
    return make_model(nodes, [("X", F32, [1, c_in, 5, 5])], [("Y", F32, None)], [tensor("W", w)] + bn)


def save(m, folder, name="m.onnx"):
    p = os.path.join(folder, name)
    with open(p, "wb") as f:
        f.write(m.SerializeToString())
    return p


def _init(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


@case
def valid(folder):
    return save(base_model(), folder)


@case
def raw_data_short(folder):
    m = base_model()
    w = _init(m, "W")
    w.raw_data = w.raw_data[:-4]
    return save(m, folder)


@case
def raw_data_long(folder):
    m = base_model()
    w = _init(m, "W")
    w.raw_data = w.raw_data + b"\0\0\0\0"
    return save(m, folder)


def _dims_claim(folder, tensor_name, dims):
    """The valid model with one tensor's dims replaced: the header claims values it does not hold."""
    m = base_model()
    t = _init(m, tensor_name)
    del t.dims[:]
    t.dims.extend(dims)
    return save(m, folder)


CASES["dims_claim_1e12"] = functools.partial(_dims_claim, tensor_name="W", dims=[1000000, 1000000, 1, 1])
CASES["small_tensor_dims_claim_1e12"] = functools.partial(_dims_claim, tensor_name="bn_var", dims=[10 ** 12])


def _misfiled(folder, tensor_name, field, value, data_type=None):
    """The valid model with one tensor's values moved from raw_data into the typed ``field``
    (and its type changed to ``data_type``), where the reader would find none or misread them."""
    m = base_model()
    t = _init(m, tensor_name)
    n = t.dims[0]
    t.ClearField("raw_data")
    if data_type is not None:
        t.data_type = data_type
    getattr(t, field).extend([value] * n)
    return save(m, folder)


CASES["string_data_in_float_tensor"] = functools.partial(_misfiled, tensor_name="bn_scale", field="string_data", value=b"x")
CASES["int64_data_in_float_tensor"] = functools.partial(_misfiled, tensor_name="bn_B", field="int64_data", value=1)
# FLOAT16 values belong in int32_data (as bits); float_data would be misread
CASES["float16_tensor_in_float_data"] = functools.partial(_misfiled, tensor_name="bn_mean", field="float_data", value=0.5,
                                                          data_type=TensorProto.FLOAT16)


@case
def bn_without_outputs(folder):
    m = base_model()
    bn = m.graph.node[1]
    del bn.output[:]
    m.graph.output[0].name = "c"
    return save(m, folder)


@case
def sparse_initializer(folder):
    """Valid: a sparse initializer read by an Add after the BN."""
    m = base_model()
    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "S")
    indices = numpy_helper.from_array(np.array([3, 17], np.int64), "S_idx")
    sp = helper.make_sparse_tensor(values, indices, [1, 8, 5, 5])
    m.graph.sparse_initializer.append(sp)
    m.graph.node[1].output[0] = "y0"
    m.graph.node.append(helper.make_node("Add", ["y0", "S"], ["Y"], name="add"))
    return save(m, folder)


def _key(field, wire_type):
    return _varint((field << 3) | wire_type)


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _ld(field, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


@case
def nesting_deeper_than_protobuf_allows(folder):
    """Ifs nested 120 deep (protobuf parses 100) around a Conv with a large weight. Written as
    raw wire bytes: protobuf itself refuses to build such a message."""
    r = rng(1)
    w = tensor("Wd", r.standard_normal((8, 4, 3, 3)).astype(np.float32)).SerializeToString()
    conv = helper.make_node("Conv", ["X", "Wd"], ["o0"], pads=[1, 1, 1, 1]).SerializeToString()
    out0 = helper.make_tensor_value_info("o0", F32, None).SerializeToString()
    graph = _ld(1, conv) + _ld(2, b"g0") + _ld(5, w) + _ld(12, out0)  # node, name, initializer, output
    for k in range(1, 121):
        attr = _ld(1, b"then_branch") + _ld(6, graph) + _key(20, 0) + _varint(5)  # name, g, type=GRAPH
        other = helper.make_attribute("else_branch", helper.make_graph(
            [helper.make_node("Identity", ["X"], [f"e{k}"])], f"e{k}", [],
            [helper.make_tensor_value_info(f"e{k}", F32, None)])).SerializeToString()
        out = f"o{k}".encode()
        node = _ld(1, b"cond") + _ld(2, out) + _ld(4, b"If") + _ld(5, attr) + _ld(5, other)
        graph = _ld(1, node) + _ld(2, f"g{k}".encode()) + _ld(12, helper.make_tensor_value_info(
            out.decode(), F32, None).SerializeToString())
    top = helper.make_graph([], "top", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                        helper.make_tensor_value_info("X", F32, [1, 4, 5, 5])],
                            [helper.make_tensor_value_info("o120", F32, None)])
    m = helper.make_model(top, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    data = m.SerializeToString()
    g = m.graph.SerializeToString() + graph  # concatenated messages merge: the nested node joins the graph
    m.ClearField("graph")
    data = m.SerializeToString() + _ld(7, g)
    p = os.path.join(folder, "m.onnx")
    with open(p, "wb") as f:
        f.write(data)
    return p


def _external(folder, **info):
    """The Conv weight in m.onnx.data; ``info`` overrides the external-data fields."""
    m = base_model()
    w = _init(m, "W")
    payload = w.raw_data
    fields = {"location": "m.onnx.data", "offset": "0", "length": str(len(payload))}
    fields.update(info)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in fields.items():
        if v is not None:
            w.external_data.add(key=k, value=v)
    with open(os.path.join(folder, "m.onnx.data"), "wb") as f:
        f.write(payload)
    return save(m, folder)


@case
def external_data_valid(folder):
    return _external(folder)


# external-data fields a file may state wrongly: each case is the valid pair with one field replaced
for _name, _info in {"external_negative_offset": {"offset": "-8"},
                     "external_negative_length": {"length": "-1152"},
                     "external_nul_in_location": {"location": "m.onnx\0.data"},
                     "external_length_disagrees_with_dims": {"length": "1000"},
                     "external_offset_not_a_number": {"offset": "zero"}}.items():
    CASES[_name] = functools.partial(_external, **_info)


@case
def external_file_shorter_without_length(folder):
    p = _external(folder, length=None)
    with open(os.path.join(folder, "m.onnx.data"), "r+b") as f:
        f.truncate(100)
    return p


@case
def external_no_length_file_longer(folder):
    """Valid (the length field is optional; ONNX Runtime reads the dims' bytes from the offset): no
    length, and the data file holds more after the tensor (a shared file, say)."""
    p = _external(folder, length=None)
    with open(os.path.join(folder, "m.onnx.data"), "ab") as f:
        f.write(b"\x7f" * 262144)
    return p


@case
def external_missing_file(folder):
    p = _external(folder)
    os.unlink(os.path.join(folder, "m.onnx.data"))
    return p


@case
def input_dims_2_pow_32(folder):
    m = base_model()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 2 ** 32
    return save(m, folder)


@case
def many_large_inputs(folder):
    """Valid: 40 inputs of 64 MiB each, summed after the BN (verification would need 2.5 GiB)."""
    m = base_model()
    m.graph.node[1].output[0] = "y0"
    prev = "y0"
    for k in range(40):
        name = f"in{k}"
        m.graph.input.append(helper.make_tensor_value_info(name, F32, [1, 8, 2048, 1024]))
        m.graph.node.append(helper.make_node("ReduceSum", [name], [f"r{k}"], keepdims=0))
        m.graph.node.append(helper.make_node("Add", [prev, f"r{k}"], [f"s{k}"]))
        prev = f"s{k}"
    m.graph.node.append(helper.make_node("Identity", [prev], ["Y"]))
    return save(m, folder)


@case
def control_characters_in_names(folder):
    m = base_model(names={"conv": "conv\x1b[31mred\x1b[0m", "bn": "bn\n::error::x\r\x07\x00\x0b"})
    return save(m, folder)


@case
def markup_and_emoji_codes_in_names(folder):
    m = base_model(names={"conv": "[bold]conv[/bold]", "bn": "bn,1:x::y :smile:"})
    return save(m, folder)


@case
def non_utf8_file_name(folder):
    p = save(base_model(), folder)
    bad = os.path.join(os.fsencode(folder), b"m\xff\xfe.onnx")
    os.rename(p, bad)
    return os.fsdecode(bad)


@case
def truncated_file(folder):
    data = base_model().SerializeToString()
    p = os.path.join(folder, "m.onnx")
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    return p


@case
def not_a_model(folder):
    p = os.path.join(folder, "m.onnx")
    with open(p, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not a model at all")
    return p


@case
def empty_file(folder):
    p = os.path.join(folder, "m.onnx")
    open(p, "wb").close()
    return p


@case
def bn_reading_a_missing_value(folder):
    m = base_model()
    m.graph.node[1].input[3] = "nowhere"
    return save(m, folder)


@case
def undefined_element_type(folder):
    m = base_model()
    _init(m, "bn_mean").data_type = 0
    return save(m, folder)


@case
def duplicate_initializer_names(folder):
    m = base_model()
    m.graph.initializer.append(tensor("W", np.zeros((8, 4, 3, 3), np.float32)))
    return save(m, folder)


def _patched(m, placeholder: bytes, replacement: bytes, folder):
    """``m`` serialized with ``placeholder`` (same length) replaced on the wire."""
    data = m.SerializeToString()
    assert data.count(placeholder) == 1 and len(placeholder) == len(replacement)
    p = os.path.join(folder, "m.onnx")
    with open(p, "wb") as f:
        f.write(data.replace(placeholder, replacement))
    return p


@case
def graph_name_not_utf8(folder):
    """protobuf parses it and hands the name over as bytes; nothing can write it back."""
    m = base_model()
    m.graph.name = "GRAPHNAME"
    return _patched(m, b"GRAPHNAME", b"GRAPHNAM\xe7", folder)


@case
def tensor_doc_string_not_utf8(folder):
    m = base_model()
    _init(m, "W").doc_string = "WEIGHTDOC"
    return _patched(m, b"WEIGHTDOC", b"WEIGHT\xff\xfe\xfd", folder)
