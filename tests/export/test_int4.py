import onnx
from edgepack.runtime import load
from edgepack.runtime.manifest import Manifest


def test_int4_package_uses_matmulnbits_and_generates(tiny_int4_package, tiny_package):
    graph = onnx.load(str(tiny_int4_package / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops
    manifest = Manifest.from_json((tiny_int4_package / "manifest.json").read_text())
    assert manifest.dtype == "int4"
    # The parity drop is reported next to the float32 check, not hidden.
    assert {"float32", "int4"} <= set(manifest.parity)
    assert manifest.parity["int4"]["max_abs_diff"] > manifest.parity["float32"]["max_abs_diff"]
    f32 = Manifest.from_json((tiny_package / "manifest.json").read_text())
    # The graph's weights may sit in model.onnx.data (fused graph): compare the model files together.
    def model_bytes(m):
        return sum(entry.size for name, entry in m.files.items() if name.startswith("model.onnx"))

    assert model_bytes(manifest) < model_bytes(f32)
    out = load(tiny_int4_package).generate("hello", max_new_tokens=5)
    assert 1 <= len(out.tokens) <= 5
