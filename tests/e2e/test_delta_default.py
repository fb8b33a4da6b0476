"""End to end: a delta applied in the runtime to the real default model (float32 package with delta slots, fused and
optimum graphs) computes what PyTorch computes with the same delta merged. Select with ``-m e2e``."""

import subprocess

import numpy as np
import pytest
import torch
from edgepack.runtime import delta_file, load
from edgepack.runtime.delta_file import Delta, FactorData, LayerDelta

pytestmark = pytest.mark.e2e

PROMPT = "Explain what a Python generator is."


@pytest.fixture(scope="module")
def torch_model():
    from edgepack.toolchain import sources

    return sources.load("default").model


@pytest.fixture(scope="module", params=["fused", "optimum"])
def slots_package(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("slots") / request.param
    argv = ["edgepack", "build", "default", "-o", str(out), "--graph", request.param, "--delta-slots"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _synthetic_delta(model, fingerprint: str) -> Delta:
    """Rank-2 changes of every third decoder linear layer, about 2 % of each weight's norm, half of them with
    sparse factors (the runtime's two factor layouts), and one norm weight moved."""
    gen = np.random.default_rng(0)
    layers = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for i, (name, module) in enumerate(linears[::3]):
        n_out, n_in = module.weight.shape
        u, v = gen.standard_normal((n_out, 2)), gen.standard_normal((n_in, 2))
        u *= 0.02 * float(module.weight.detach().norm()) / np.linalg.norm(u @ v.T)
        if i % 2:
            keep_u, keep_v = (np.flatnonzero(gen.random(a.size) < 0.5) for a in (u, v))
            uf = FactorData(u.ravel()[keep_u].astype(np.float32), keep_u)
            vf = FactorData(v.ravel()[keep_v].astype(np.float32), keep_v)
        else:
            uf, vf = FactorData(u.astype(np.float32).ravel()), FactorData(v.astype(np.float32).ravel())
        layers[name] = LayerDelta(name, n_out, n_in, 2, uf, vf, 32 * 2 * (n_out + n_in))
    norm = "model.layers.3.input_layernorm.weight"
    dense = {norm: (0.1 * gen.standard_normal(model.get_parameter(norm).shape)).astype(np.float32)}
    return Delta(fingerprint, layers, dense, {"method": "synthetic", "r": 2})


def test_runtime_delta_matches_merged_pytorch(slots_package, torch_model, tmp_path):
    from edgepack.toolchain.delta.merge import merged

    model = load(slots_package)
    path = tmp_path / "synthetic.safetensors"
    delta_file.write(_synthetic_delta(torch_model, model.package.manifest.model["weights_fingerprint"]), path)
    delta = delta_file.read(path)  # what the file holds is what both sides apply
    ids = model.encode_prompt(PROMPT)
    base = model.decoder.forward(ids, model.decoder.new_cache(), all_logits=True)
    model.apply_delta(path)
    applied = model.decoder.forward(ids, model.decoder.new_cache(), all_logits=True)
    with merged(torch_model, delta), torch.no_grad():
        want = torch_model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(applied - base).max() > 0.5  # the delta does change the answer's logits
    np.testing.assert_allclose(applied, want, atol=1e-3 * np.abs(want).max())
    model.apply_delta(None)  # and removing it restores the base without a reload
    np.testing.assert_array_equal(model.decoder.forward(ids, model.decoder.new_cache(), all_logits=True), base)
