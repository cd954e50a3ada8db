"""Storage that follows the kept weights (pyro_sparse.storage): CSR in the file where smaller, the
plain torch layer where nothing was removed, kernels that compute what F.linear computes, compact
format 3, the compact network's pooling and layer loop."""

import io

import pytest
import torch
from torch import nn

from pyro_sparse.layers import Linear, MaxPool2d, ReLU, StridedMaxPool2d
from pyro_sparse.network import BayesianNetwork
from pyro_sparse.rebuild import compact, masked_module
from pyro_sparse.reduced_runs import load_compact, save_compact
from pyro_sparse.storage import (
    KERNELS,
    CompactLinear,
    SparseConv2d,
    csr_parts,
    decide,
    dense_twin,
    measure_kernels,
    storage_bytes,
)

TOL = 1e-5


def _sparse(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)


def test_csr_parts_hold_exactly_the_nonzero_entries_row_by_row():
    w = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, -3.0]])
    crow, col, values = csr_parts(w)
    assert crow.tolist() == [0, 1, 1, 3] and col.tolist() == [1, 0, 2] and values.tolist() == [2.0, 1.0, -3.0]
    assert crow.dtype == torch.int32 and col.dtype == torch.int16  # 16-bit columns below 32768
    assert storage_bytes((3, 3), 3) == {"dense": 36, "csr": 3 * 6 + 4 * 4}


@pytest.mark.parametrize("kernels", [("linear", "linear"), ("t", "t"), ("csr", "csr"), ("linear", "csr")])
def test_every_kernel_computes_the_linear_map(kernels):
    w, b = _sparse((30, 70), 0.1), torch.randn(30)
    layer = CompactLinear(70, 30, kernels=kernels, switch_rows=4)
    layer.load_state_dict({"weight": w, "bias": b})
    layer.requires_grad_(False)
    for shape in [(1, 70), (3, 70), (9, 70), (2, 5, 70), (0, 70), (70,)]:
        x = torch.randn(shape)
        out = layer(x)
        assert out.shape == (*shape[:-1], 30)
        assert (out - torch.nn.functional.linear(x, w, b)).abs().max().item() <= TOL if x.numel() else True


def test_a_fine_tune_gets_gradients_through_every_kernel():
    w = _sparse((5, 8), 0.3)
    for kernel in KERNELS:
        layer = CompactLinear(8, 5, kernels=(kernel, kernel))
        layer.load_state_dict({"weight": w, "bias": torch.zeros(5)})
        layer(torch.randn(4, 8)).sum().backward()
        assert layer.weight.grad is not None and layer.weight.grad.shape == (5, 8)


def test_csr_storage_writes_the_kept_weights_only_and_loads_back():
    w, b = _sparse((40, 300), 0.05), torch.randn(40)
    layer = CompactLinear(300, 40)
    layer.load_state_dict({"weight": w, "bias": b})
    state = layer.state_dict()
    assert set(state) == {"bias", "weight_values", "weight_col", "weight_crow"}
    assert state["weight_values"].numel() == int((w != 0).sum()) == layer.nnz
    again = CompactLinear(300, 40)
    again.load_state_dict(state)
    assert torch.equal(again.weight, w) and torch.equal(again.bias, b)
    dense = CompactLinear(300, 40, csr_storage=False)
    dense.load_state_dict(state)  # either form loads; this one saves dense
    assert set(dense.state_dict()) == {"weight", "bias"}

    def size(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return len(buf.getvalue())

    assert size(state) < size(dense.state_dict()) / 4
    bad = dict(state, weight_crow=state["weight_crow"][:-1])
    with pytest.raises(RuntimeError, match="not a CSR matrix of 40 x 300"):
        CompactLinear(300, 40).load_state_dict(bad)


def test_a_csr_convolution_computes_with_its_dense_kernel():
    w = _sparse((6, 3, 3, 3), 0.1)
    conv = SparseConv2d(3, 6, 3, padding=1)
    conv.load_state_dict({"weight": w, "bias": torch.zeros(6)})
    assert "weight_values" in conv.state_dict()
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, w, torch.zeros(6), padding=1))
    twin = dense_twin(nn.Sequential(conv))
    assert type(twin[0]) is nn.Conv2d and torch.equal(twin[0].weight, w)


def test_decide_plain_layer_where_nothing_was_removed_csr_where_smaller():
    full = torch.randn(20, 30)
    assert decide("linear", full, None, 1, "auto")["layer"] == "plain"
    assert decide("linear", _sparse((20, 30), 0.9), None, 1, "csr")["storage"] == "dense"  # CSR not smaller
    sparse = decide("linear", _sparse((200, 300), 0.02), None, 1, "csr")
    assert sparse == {**sparse, "layer": "compact", "storage": "csr", "kernels": ["csr", "csr"]}
    assert decide("linear", _sparse((200, 300), 0.02), None, 1, "dense")["layer"] == "plain"
    conv = decide("conv2d", _sparse((20, 30, 3, 3), 0.05), None, 16, "auto")
    assert conv["storage"] == "csr" and "kernels" not in conv  # convolutions: the dense kernel, nothing timed
    with pytest.raises(ValueError, match="storage: expected one of"):
        decide("linear", full, None, 1, "sparse")


def test_measured_kernels_name_the_fastest_at_each_size():
    t = measure_kernels(_sparse((64, 128), 0.05), torch.zeros(64), 1, repeats=2)
    assert t["rows"] == [1, 256] and set(t["us"]) == set(KERNELS)
    assert all(len(v) == 2 and min(v) > 0 for v in t["us"].values())
    assert t["small"] == min(KERNELS, key=lambda k: t["us"][k][0])
    assert t["large"] == min(KERNELS, key=lambda k: t["us"][k][1])
    assert (t["switch_rows"] is None) == (t["small"] == t["large"])
    if t["switch_rows"] is not None:
        assert 1 < t["switch_rows"] <= 256


def _net_and_masks():
    torch.manual_seed(0)
    net = BayesianNetwork([Linear(64, 120), ReLU(), Linear(120, 60), ReLU(), Linear(60, 10)])
    values = {f"{name}.{p}": torch.randn(s) * 0.1 for name, layer in net.bayesian_layers()
              for p, s in layer.param_shapes().items()}
    g = torch.Generator().manual_seed(1)
    masks = {"fc1.weight": torch.rand(120, 64, generator=g) < 0.05,
             "fc2.weight": torch.rand(60, 120, generator=g) < 0.1}
    return net, values, masks


@pytest.mark.parametrize("storage", ["csr", "dense", "auto"])
def test_compact_networks_store_and_load_as_decided(storage, tmp_path):
    net, values, masks = _net_and_masks()
    small = compact(net, values, masks, storage=storage)
    layers = small.plan.layers
    assert layers["fc3"]["storage"]["layer"] == "plain" and type(small.fc3) is nn.Linear  # nothing removed
    kinds = {name: type(getattr(small, name)) for name in ("fc1", "fc2")}
    if storage == "dense":
        assert set(kinds.values()) == {nn.Linear}
    else:
        assert set(kinds.values()) == {CompactLinear} and layers["fc1"]["storage"]["storage"] == "csr"
        assert small.spec["layers"][0]["storage"] == "csr" and "kernels" in small.spec["layers"][0]
    x = torch.randn(50, 64)
    with torch.no_grad():
        assert (small(x) - masked_module(net, values, masks)(x)).abs().max().item() <= TOL
    path = str(tmp_path / "c.pt")
    save_compact(path, small, {})
    again = load_compact(path)
    with torch.no_grad():
        assert (again(x) - small(x)).abs().max().item() <= TOL
    assert [type(m) for m in again] == [type(m) for m in small]


def test_the_compact_file_shrinks_with_the_kept_weights(tmp_path):
    net, values, masks = _net_and_masks()
    sizes = {}
    for storage in ("dense", "csr"):
        save_compact(str(tmp_path / storage), compact(net, values, masks, storage=storage), {})
        sizes[storage] = (tmp_path / storage).stat().st_size
    assert sizes["csr"] < sizes["dense"] / 2.5


def test_an_old_compact_format_is_refused_with_the_reason(tmp_path):
    net, values, masks = _net_and_masks()
    small = compact(net, values, masks, storage="csr")
    path = str(tmp_path / "old.pt")
    save_compact(path, small, {})
    data = torch.load(path, weights_only=True)
    data["spec"]["format"] = 2
    torch.save(data, path)
    from pyro_sparse.errors import CheckpointError

    with pytest.raises(CheckpointError, match="compact format 2; this version reads format 3.*reduce the run again"):
        load_compact(path)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (3, 3)])
def test_the_compact_max_pool_computes_torchs_values(k, size):
    module = MaxPool2d.build_compact({"type": "maxpool2d", "kernel_size": k, "stride": k, "padding": 0})
    assert type(module) is StridedMaxPool2d
    for batch in (4, 2048):  # torch's kernel below 2**14 elements, the strided maxima from there
        x = torch.randn(batch, 5, *size)
        assert torch.equal(module(x), nn.functional.max_pool2d(x, k))
    padded = MaxPool2d.build_compact({"type": "maxpool2d", "kernel_size": 2, "stride": 1, "padding": 0})
    assert type(padded) is nn.MaxPool2d  # overlapping windows: torch's pool


def test_hooks_on_a_compact_layer_still_run():
    net, values, masks = _net_and_masks()
    small = compact(net, values, masks, storage="csr")
    seen = []
    handle = small.fc2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    small(torch.randn(3, 64))
    handle.remove()
    small(torch.randn(3, 64))
    assert seen == [torch.Size([3, small.fc2.out_features])]


def test_2_4_layers_stay_dense_where_the_device_has_no_semi_structured_kernels():
    from pyro_sparse.reduction.scores import mask_n_m
    from pyro_sparse.storage import pattern_holds, semi_structured

    w = torch.randn(64, 128)
    w = w * mask_n_m(w.abs(), 2, 4, dim=1)
    assert pattern_holds(w, 2, 4) and not pattern_holds(torch.randn(4, 8), 2, 4)
    layer = nn.Linear(128, 64)
    with torch.no_grad():
        layer.weight.copy_(w)
    module, notes = semi_structured(nn.Sequential(layer))
    assert module[0] is layer and torch.equal(layer.weight, w)  # the CPU: nothing changes, and it says so
    assert "no semi-structured sparse kernels" in notes["0"]


@torch.no_grad()  # inference (a fine-tune runs F.linear)
def test_feature_major_outputs_are_contiguous_where_the_caller_sees_them():
    from pyro_sparse.storage import CompactSequential

    w = _sparse((10, 35), 0.3)
    inner = CompactLinear(35, 10, kernels=("t", "t"))
    inner.load_state_dict({"weight": w, "bias": torch.zeros(10)})
    assert not inner(torch.randn(8, 35)).is_contiguous()  # inside a compact network: the view
    mine = CompactLinear(35, 10, kernels=("t", "t"), contiguous=True)  # inside code of the user's
    mine.load_state_dict({"weight": w, "bias": torch.zeros(10)})
    assert mine(torch.randn(8, 35)).is_contiguous()
    net = CompactSequential(inner, nn.ReLU())
    assert net(torch.randn(8, 35)).is_contiguous()
    assert net(torch.randn(8, 35)).view(-1).shape == (80,)
