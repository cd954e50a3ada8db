"""Data-parallel SVI with torch.distributed: sharding, exact gradient averaging, rank-0 writes,
resume, and a torchrun launch of the CLI (2 CPU processes, gloo)."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DistributedSampler

from pyro_sparse import distributed as ddp
from pyro_sparse.cli import main
from pyro_sparse.errors import PyroSparseError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"layers": [{"type": "linear", "in": "auto", "out": 32}, {"type": "relu"}, {"type": "linear", "out": "auto"}]}
RECIPE = {"epochs": 4, "batch_size": 128, "optimizer": {"name": "Adam", "lr": 0.01}, "kl_warmup_epochs": 2,
          "eval_samples": 3, "seed": 1}


def launch(fn, *args):
    """Run ``fn(*args)`` in 2 local processes (gloo). A fork server that has imported torch,
    pyro and scikit-learn once starts them in well under a second instead of ~5 s each."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "pyro", "sklearn", "pyro_sparse.runs",
                                                "test_distributed"])
    ddp.launch_local(fn, 2, args=args, timeout_s=120, start_method=method)


def write_specs(tmp_path):
    m, r = tmp_path / "m.yaml", tmp_path / "r.yaml"
    m.write_text(yaml.safe_dump(SMALL))
    r.write_text(yaml.safe_dump(RECIPE))
    return str(m), str(r)


# ------------------------------------------------------------------ sharding (no process group)
@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 4), (1437, 2)])
def test_shard_indices_are_distributed_samplers(n, world):
    """Same indices as torch's DistributedSampler (seed + epoch generator, wrap-around padding)."""
    for epoch in (0, 3):
        for r in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=5)
            sampler.set_epoch(epoch)
            ours = ddp.shard_indices(n, epoch=epoch, seed=5, rank_=r, world=world)
            assert ours.tolist() == list(sampler)


def test_union_of_local_batches_is_the_global_batch():
    """Rank r's k-th batch of b rows from perm[r::W]: together they are perm[k*W*b:(k+1)*W*b]."""
    n, world, b = 23, 3, 4  # 23 -> padded to 24
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([perm, perm[:1]])
    shards = [ddp.shard(perm, rank_=r, world=world) for r in range(world)]
    assert {len(s) for s in shards} == {8}
    for k in range(2):
        union = sorted(sum((s[k * b:(k + 1) * b].tolist() for s in shards), []))
        assert union == sorted(padded[k * world * b:(k + 1) * world * b].tolist())
    # without padding the shards partition the indices (for sums over the data)
    parts = [ddp.shard(perm, pad=False, rank_=r, world=world) for r in range(world)]
    assert sorted(torch.cat(parts).tolist()) == list(range(n))


def test_single_process_helpers_are_identities():
    assert not ddp.is_distributed() and ddp.rank() == 0 and ddp.world_size() == 1 and ddp.is_main_process()
    g = torch.arange(5.0)
    assert ddp.all_reduce_sum(g) is g and g.tolist() == [0, 1, 2, 3, 4]
    assert ddp.shard(g) is g
    assert ddp.on_main(lambda x: x + 1, 1) == 2
    assert len({ddp.rank_seed(0, e) for e in range(100)}) == 100 and ddp.rank_seed(0, 1) == ddp.rank_seed(0, 1)


def test_distributed_flag_outside_torchrun_is_a_clear_error(tmp_path, monkeypatch, capsys):
    for key in ddp.ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(PyroSparseError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not set"):
        ddp.init_from_env()
    m, r = write_specs(tmp_path)
    assert main(["fit", "--model", m, "--inference", r, "--data", "digits", "--out", str(tmp_path / "x"),
                 "--distributed", "--no-progress"]) == 2
    assert "torchrun" in capsys.readouterr().err


# ------------------------------------------------------------------ 2 processes, gloo
def _gradient_worker():
    """Every rank: the trainer's averaged gradient of one step equals the single-process
    gradient on the union of both ranks' batches (plate scale N / (W b)), for the MAP guide and
    for the mean-field guide with the same weight draw on every rank."""
    from pyro_sparse.data import load_digits
    from pyro_sparse.elbo import MeanFieldELBO
    from pyro_sparse.fitting import SVITrainer
    from pyro_sparse.recipe import parse_recipe
    from pyro_sparse.runs import build
    from pyro_sparse.spec import parse_model_spec

    r, world = ddp.rank(), ddp.world_size()
    assert world == 2 and ddp.is_distributed()
    # collectives
    a, b = torch.tensor(r + 1.0), torch.tensor([float(r), 1.0])
    ddp.all_reduce_sum([a, b])
    assert a.item() == 3.0 and b.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError if r == 0 else PyroSparseError, match="boom"):
        ddp.on_main(_fail)

    data = load_digits()
    n = len(data.x_train)  # 1437: odd, so the permutation is padded by one row
    spec = parse_model_spec(SMALL)
    for guide_name in ("delta", "meanfield"):
        recipe = parse_recipe({"guide": guide_name, "local_reparam": False, "batch_size": 100, "seed": 3,
                               "optimizer": {"name": "SGD", "lr": 0.05}})
        net, guide = build(spec, recipe, data)
        trainer = SVITrainer(net, guide, data, recipe, progress=False)
        assert (trainer.num_local, trainer.batch_size, trainer.steps_per_epoch) == (719, 50, 15)
        g = torch.Generator()
        g.set_state(trainer.generator.get_state())
        perm = torch.randperm(n, generator=g)
        padded = torch.cat([perm, perm[:1]])
        local = padded[r::world]
        # the epoch's batches as the trainer forms them
        seen = [idx.clone() for _, idx, _ in trainer.epoch_batches()]
        trainer.recipe = {**trainer.recipe, "kl_warmup_epochs": 0}  # the full KL weight, as the reference
        assert torch.equal(torch.cat(seen), local) and [len(s) for s in seen] == [50] * 14 + [19]
        elbo = MeanFieldELBO(kl_weight=1.0, local_reparam=False)
        params = list(guide.parameters())
        for k in (0, 14):  # a full step (2 x 50 rows) and the short last one (2 x 19)
            mine = local[k * 50:(k + 1) * 50]
            both = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(both, mine)
            union = torch.cat(both)  # what one process would see: plate scale N / len(union)
            assert sorted(union.tolist()) == sorted(padded[k * 100:(k + 1) * 100].tolist())
            torch.manual_seed(11)  # the same weight draw in the reference and on every rank
            loss = elbo.differentiable_loss(net.model, guide, data.x_train[union], data.y_train[union],
                                            dataset_size=n, subsample=union)
            expected = torch.autograd.grad(loss, params)
            torch.manual_seed(11)
            trainer.step((0, mine, None))
            for p, e in zip(params, expected):
                scale = e.abs().max().item()
                assert torch.allclose(p.grad, e, rtol=1e-5, atol=1e-6 * scale), \
                    (guide_name, k, (p.grad - e).abs().max().item(), scale)
    # parameters stay identical across ranks (same averaged gradients, same optimiser)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])


def _fail():
    raise ValueError("boom")


def test_averaged_gradient_equals_single_process_gradient_on_the_union():
    launch(_gradient_worker)


def _resume_worker(tmp):
    """fit_run under a process group: rank 1 never writes; 2 epochs + resume = 4 straight epochs."""
    from pyro_sparse import runs, training

    if ddp.rank() == 1:
        def forbidden(*args, **kwargs):
            raise AssertionError(f"rank 1 wrote a file: {args[1] if len(args) > 1 else args}")

        for module, names in ((training, ("save_atomic", "write_text_atomic")),
                              (runs, ("write_json_atomic", "write_text_atomic"))):
            for name in names:
                setattr(module, name, forbidden)
    m, r = os.path.join(tmp, "m.yaml"), os.path.join(tmp, "r.yaml")
    _, straight = runs.fit_run(m, r, "digits", os.path.join(tmp, "a"), progress=False)
    runs.fit_run(m, r, "digits", os.path.join(tmp, "b"), epochs=2, progress=False)
    if ddp.is_main_process():  # continue the interrupted run to the recipe's 4 epochs
        path = os.path.join(tmp, "b", "inference.yaml")
        recipe = yaml.safe_load(open(path))
        recipe["epochs"] = 4
        open(path, "w").write(yaml.safe_dump(recipe))
    dist.barrier()
    _, resumed = runs.fit_run(m, r, "digits", os.path.join(tmp, "b"), resume=True, progress=False)
    for key in ("test_accuracy", "test_nll", "epochs", "steps"):
        assert resumed[key] == straight[key], key  # the same figures on every rank
    with open(os.path.join(tmp, f"metrics-rank{ddp.rank()}.json"), "w") as f:
        json.dump(straight, f)


def test_distributed_fit_resumes_exactly_and_only_rank_0_writes(tmp_path):
    write_specs(tmp_path)
    launch(_resume_worker, str(tmp_path))
    a = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [x["epoch"] for x in b] == [1, 2, 3, 4]
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert [x["test_nll"] for x in a] == [x["test_nll"] for x in b]
    ranks = [json.load(open(tmp_path / f"metrics-rank{r}.json")) for r in range(2)]
    assert ranks[0]["test_accuracy"] == ranks[1]["test_accuracy"]  # rank 0's evaluation, broadcast
    # global batch 128 = 64 per rank; 1437 rows -> 719 per rank -> 12 steps per epoch, as in one process
    assert ranks[0]["steps"] == 4 * 12


# ------------------------------------------------------------------ torchrun + CLI
@pytest.mark.slow
def test_torchrun_cli_fit_matches_single_process_accuracy(tmp_path):
    from pyro_sparse.runs import fit_run

    m, r = write_specs(tmp_path)
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for key in ddp.ENV + ("LOCAL_RANK",):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(ddp.free_port()),
           "-m", "pyro_sparse", "fit", "--model", m, "--inference", r, "--data", "digits", "--out", str(out),
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fitted") == 1  # rank 0 prints
    for name in ("model.yaml", "inference.yaml", "metrics.jsonl", "checkpoint.pt", "metrics.json", "run.json"):
        assert (out / name).exists(), name
    distributed = json.load(open(out / "metrics.json"))
    _, single = fit_run(m, r, "digits", str(tmp_path / "single"), progress=False)
    assert distributed["epochs"] == single["epochs"] == 4 and distributed["steps"] == single["steps"] == 48
    assert distributed["test_accuracy"] > 0.8
    assert abs(distributed["test_accuracy"] - single["test_accuracy"]) <= 0.03


# ------------------------------------------------------------------ method laplace (SpaM), 2 processes
LAPLACE = {"method": "laplace", "guide": "delta", "epochs": 2, "batch_size": 128,
           "optimizer": {"name": "Adam", "lr": 0.01}, "seed": 2,
           "laplace": {"structure": "layerwise", "burn_in": 0, "marglik_frequency": 1, "hyper_steps": 5,
                       "hyper_lr": 0.1, "curvature_subset": 300}}


def even_digits():
    """digits with 1436 training rows: W = 2 divides N and the global batch, so no row is padded
    and the union of the ranks' batches is exactly the single-process batch."""
    from pyro_sparse.data import Dataset, load_digits

    d = load_digits()
    return Dataset(d.name, d.x_train[:1436], d.y_train[:1436], d.x_test, d.y_test, d.task, d.num_outputs)


def _laplace_statistics_worker():
    """All-reduced statistics of 2 shards == the single-process statistics of the whole set (float64):
    diagonal GGN and EF, KFAC (A adds up, G is a count-weighted mean), subsets, log-likelihood."""
    from pyro_sparse.data import data_batches, load_digits
    from pyro_sparse.laplace.curvature import log_likelihood
    from pyro_sparse.laplace.posterior import curvature_of
    from pyro_sparse.laplace.trainer import laplace_statistics
    from pyro_sparse.likelihoods import Categorical

    def single_process(x, y, curvature="diag", hessian="ggn", rows=None):
        """The curvature of one process on the given rows, scaled by N / m for a subset."""
        xs, ys = (x, y) if rows is None else (x[rows], y[rows])
        curv = curvature_of(net, data_batches(xs, ys), lik, curvature, hessian)
        scale = len(x) / len(xs)
        if curvature == "kfac":
            return {k: (a * scale, g) for k, (a, g) in curv.items()}
        return {k: h * scale for k, h in curv.items()}

    lik = Categorical()
    data = load_digits()
    x, y = data.x_train.double(), data.y_train  # 1437 rows: shards of 719 and 718
    torch.manual_seed(0)  # the same network on both ranks
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).double()
    with torch.no_grad():
        reference_ll = log_likelihood(net, x, y, "categorical")
    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))[:301]  # odd subset: 151 + 150
    for curvature, hessian, subset in (("diag", "ggn", None), ("diag", "ggn", 301), ("diag", "ef", 301),
                                       ("kfac", "ggn", None), ("kfac", "ggn", 301)):
        curv, ll = laplace_statistics(net, x, y, lik, curvature=curvature, hessian=hessian,
                                      rows=None if subset is None else rows)
        reference = single_process(x, y, curvature, hessian, None if subset is None else rows)
        assert abs(ll.item() - reference_ll.item()) <= 1e-9 * abs(reference_ll.item())
        assert set(curv) == set(reference)
        pairs = [(curv[k], reference[k]) for k in reference] if curvature == "diag" else \
            [(c, r) for k in reference for c, r in zip(curv[k], reference[k])]
        for got, want in pairs:
            err, scale = (got - want).abs().max().item(), want.abs().max().item()
            assert scale > 0 and err <= 1e-9 * scale, (curvature, hessian, subset, err, scale)
    # one rank's own share is not the whole (the reduction is what makes them equal)
    mine = single_process(x[ddp.rank()::2], y[ddp.rank()::2])
    assert (mine["0.weight"] - single_process(x, y)["0.weight"]).abs().max() > 1e-3


def test_laplace_statistics_summed_over_shards_equal_the_full_set():
    launch(_laplace_statistics_worker)


def _laplace_fit(data, out_dir=None, epochs=None, resume=False):
    from pyro_sparse.laplace.trainer import LaplaceTrainer
    from pyro_sparse.runs import build, parse_specs

    spec, recipe = parse_specs(SMALL, LAPLACE)
    network, guide = build(spec, recipe, data)
    trainer = LaplaceTrainer(network, guide, data, recipe, out_dir=out_dir, progress=False)
    trainer.fit(epochs=epochs, resume=resume)
    return trainer


def _laplace_log_delta(trainer):
    return torch.cat([v.detach().reshape(-1) for v in trainer.prior.full_log_precision_dict().values()])


def _laplace_fit_worker(tmp):
    """A 2-epoch data-parallel Laplace fit (a marglik step after each epoch); rank 1 never writes;
    1 epoch + resume = 2 straight epochs."""
    from pyro_sparse import training

    if ddp.rank() == 1:
        def forbidden(*args, **kwargs):
            raise AssertionError(f"rank 1 wrote a file: {args[1] if len(args) > 1 else args}")

        training.save_atomic = training.write_text_atomic = forbidden
    data = even_digits()
    straight = _laplace_fit(data, os.path.join(tmp, "a"))
    assert (straight.num_local, straight.batch_size, straight.steps_per_epoch) == (718, 64, 12)
    _laplace_fit(data, os.path.join(tmp, "b"), epochs=1)
    dist.barrier()
    resumed = _laplace_fit(data, os.path.join(tmp, "b"), resume=True)
    assert torch.equal(_laplace_log_delta(resumed), _laplace_log_delta(straight))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    # weights and precisions are identical on both ranks
    flat = torch.cat([p.detach().reshape(-1) for p in straight.net.parameters()] + [_laplace_log_delta(straight)])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])
    torch.save({"history": straight.history, "log_delta": _laplace_log_delta(straight)},
               os.path.join(tmp, f"laplace-rank{ddp.rank()}.pt"))


def test_distributed_laplace_fit_matches_one_process_and_only_rank_0_writes(tmp_path):
    launch(_laplace_fit_worker, str(tmp_path))
    single = _laplace_fit(even_digits())
    ranks = [torch.load(tmp_path / f"laplace-rank{r}.pt") for r in range(2)]
    untimed = [[{k: v for k, v in h.items() if not k.endswith("seconds")} for h in r["history"]] for r in ranks]
    assert untimed[0] == untimed[1]  # rank 0's evaluation, the all-reduced loss and marglik
    files = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [f["epoch"] for f in files] == [1, 2] and [f["loss"] for f in files] == [h["loss"]
                                                                                   for h in ranks[0]["history"]]
    for got, want in zip(ranks[0]["history"], single.history):
        # the MAP steps are the single-process steps on the same global batches, the marglik
        # steps see the same (all-reduced) statistics: equal up to float32 summation order
        for key in ("loss", "log_marglik", "log_prior_precision_mean", "test_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key
    want = _laplace_log_delta(single)
    assert want.abs().max() > 0.05  # log delta (0 at the start) has moved
    torch.testing.assert_close(ranks[0]["log_delta"], want, rtol=0, atol=1e-5)
