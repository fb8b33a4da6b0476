import pytest
from edgepack.export import onnx_export, parity
from edgepack.runtime.errors import ParityError, UnsupportedArchitecture


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import tiny

    model = tiny.make_model(seed=0)
    files = onnx_export.export(model, tmp_path_factory.mktemp("onnx"))
    return model, files[0]


PROMPTS = [[5, 17, 80, 200, 31, 9], [100, 101, 102, 7, 250, 3, 44, 60, 61, 62]]


def test_export_matches_pytorch(exported):
    model, path = exported
    report = parity.check(model, path, PROMPTS, decode_steps=3)
    assert report.passed
    assert report.max_abs_diff < 1e-3
    assert report.top1_agreement == 1.0
    assert report.positions == sum(len(p) + 3 for p in PROMPTS)


def test_wrong_weights_fail_parity(exported):
    import tiny

    _, path = exported
    other = tiny.make_model(seed=1)
    with pytest.raises(ParityError, match="differs from PyTorch"):
        parity.check(other, path, PROMPTS)


def test_factorized_linear_layers_export_as_two_matmuls(tmp_path):
    """Compressed models replace a Linear by Sequential(Linear, Linear); the export keeps both."""
    import onnx
    import tiny
    import torch

    model = tiny.make_model(seed=2)
    mlp = model.model.layers[-1].mlp
    dense = mlp.down_proj
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    rank = 16
    first = torch.nn.Linear(dense.in_features, rank, bias=False)
    second = torch.nn.Linear(rank, dense.out_features, bias=False)
    with torch.no_grad():
        first.weight.copy_(s[:rank, None] * vh[:rank])
        second.weight.copy_(u[:, :rank])
    mlp.down_proj = torch.nn.Sequential(first, second)
    files = onnx_export.export(model, tmp_path)
    graph = onnx.load(str(files[0])).graph
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and "layers.1/mlp/down_proj" in n.name]
    assert len(matmuls) == 2
    assert parity.check(model, files[0], PROMPTS).passed


def test_unsupported_architecture_is_refused_by_name():
    class Config:
        model_type = "not-a-real-arch"

    with pytest.raises(UnsupportedArchitecture, match="not-a-real-arch"):
        onnx_export.check_exportable(Config())
