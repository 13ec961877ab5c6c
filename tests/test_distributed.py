"""DDP with fusedoptim on the gloo backend, two processes on this machine."""

import faulthandler
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedoptim
from tolerances import FP32_VS_TORCH
from torch_versions import FSDP2, NO_FSDP2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: 8-bit states on the tiny models here: every tensor quantized, blocks of 64.
BITS8 = dict(state_bits=8, min_quantized_numel=1, state_block_size=64)


#: A worker's whole run takes seconds; one still alive after this many has
#: hung (a gloo rendezvous or collective that never completes).
WORKER_DEADLINE_S = 180
#: Exit status of a worker stopped by the deadline (faulthandler exits with 1).
_DEADLINE_EXIT = 1


def _init_worker(rank, world, port):
    """Join the process group, with a guard against a hang: a deadline after
    which faulthandler's watchdog thread (which runs without the GIL) prints
    every thread's stack and ends the process with status 1, so that the
    test retries, then fails, instead of waiting for ever."""
    faulthandler.enable(file=sys.stderr, all_threads=True)  # a Python stack if gloo aborts
    faulthandler.dump_traceback_later(WORKER_DEADLINE_S, exit=True, file=sys.stderr)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _worker(rank, world, port, runs, out):
    """Each of ``runs``, ``(impl, zero, bits)``, in turn in one process
    group: one spawn (two Python starts) serves every comparison."""
    _init_worker(rank, world, port)
    try:
        for impl, zero, bits in runs:
            _ddp_train(rank, world, impl, f"{out}-{impl}-{zero}-{bits}.pt", zero, bits)
    finally:
        dist.destroy_process_group()


def _ddp_train(rank, world, impl, out, zero, bits):
    """10 AdamW steps of a small MLP under DDP, with ZeroRedundancyOptimizer
    (and a consolidated save and load) where ``zero``; rank 0 saves the
    final params to ``out``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    lib = fusedoptim if impl == "fusedoptim" else torch.optim
    kw = BITS8 if bits else {}
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=lib.AdamW, lr=1e-2, weight_decay=0.1, **kw)
    else:
        opt = lib.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1, **kw)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(10):
        x = torch.randn(16, 8, generator=gen)
        loss = ddp(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if zero:
        # Consolidate the sharded state on rank 0, save it, load it back.
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            sd = opt.state_dict()
            assert len(sd["state"]) == len(list(model.parameters()))
            if bits:  # plain uint8 codes and fp32 scales, consolidated from both ranks
                assert all(s["exp_avg_codes"].dtype == torch.uint8 for s in sd["state"].values())
            torch.save(sd, out + ".opt")
        dist.barrier()
        opt.load_state_dict(torch.load(out + ".opt", weights_only=False))
        x = torch.randn(16, 8, generator=gen)
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
    if rank == 0:
        torch.save([p.detach().clone() for p in model.parameters()], out)
    # The replicas stay identical: every rank applied the same averaged grads.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered)
    # Both ranks leave together: a rank that tears gloo down while its
    # peer still has a transfer in flight can abort the peer's process.
    dist.barrier()


def _spawn(fn, args_without_port, nprocs=2):
    """mp.spawn with a fresh port, tried twice when a worker dies of SIGABRT
    or is stopped by its deadline: gloo can abort a process in its teardown
    ("terminate called without an active exception", pytorch/pytorch#28126)
    when the machine is loaded, and a rendezvous on a loaded machine has
    been seen to hang. A worker's own error (an assertion, a wrong result)
    fails the test at once, as does a second abort or hang."""
    for attempt in range(2):
        try:
            mp.spawn(fn, args=(nprocs, _free_port(), *args_without_port), nprocs=nprocs, join=True)
            return
        except mp.ProcessExitedException as e:
            transient = getattr(e, "signal_name", None) == "SIGABRT" or e.exit_code == _DEADLINE_EXIT
            if attempt == 1 or not transient:
                raise


#: Every DDP run of this module: (optimizer, ZeRO, state_bits).
_DDP_RUNS = [(impl, zero, None) for zero in (False, True) for impl in ("fusedoptim", "torch")] + \
            [("fusedoptim", zero, 8) for zero in (False, True)]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Rank 0's final params of every run in ``_DDP_RUNS``, trained in one spawn."""
    out = str(tmp_path_factory.mktemp("ddp") / "params")
    _spawn(_worker, (_DDP_RUNS, out))
    return {run: torch.load(f"{out}-{run[0]}-{run[1]}-{run[2]}.pt") for run in _DDP_RUNS}


def test_ddp_fusedoptim_matches_ddp_torch(ddp_results):
    ours, ref = ddp_results["fusedoptim", False, None], ddp_results["torch", False, None]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32_VS_TORCH)


def test_zero_redundancy_with_fusedoptim_trains_saves_and_reloads(ddp_results):
    ours, ref = ddp_results["fusedoptim", True, None], ddp_results["torch", True, None]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32_VS_TORCH)


def _reference_8bit(steps, shards=None):
    """The 8-bit run of the workers in one process: each step the grads of
    both ranks' batches, averaged as DDP averages them ((g0 + g1) / 2 is
    exact to the bit: halving is exact and a sum of two is commutative).
    With ``shards``, each param is updated as its FSDP2 shards (dim-0 chunks,
    one tensor each): 8-bit blocks run over each rank's local shard."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    params = list(model.parameters())
    if shards:
        pieces = [[torch.nn.Parameter(c.detach().clone()) for c in p.detach().chunk(shards, 0)] for p in params]
        opt = fusedoptim.AdamW([{"params": [c for c in cs if c.numel()]} for cs in pieces if any(c.numel() for c in cs)],
                               lr=1e-2, weight_decay=0.1, **BITS8)
    else:
        opt = fusedoptim.AdamW(params, lr=1e-2, weight_decay=0.1, **BITS8)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for _ in range(steps):
        per_rank = [torch.autograd.grad(model(torch.randn(16, 8, generator=g)).pow(2).mean(), params) for g in gens]
        avg = [(a + b) / 2 for a, b in zip(*per_rank)]
        if shards:
            for p, cs, g in zip(params, pieces, avg):
                for c, gc in zip(cs, g.chunk(shards, 0)):
                    c.grad = gc.clone()
            opt.step()
            with torch.no_grad():
                for p, cs in zip(params, pieces):
                    p.copy_(torch.cat([c.detach() for c in cs], 0))
        else:
            for p, g in zip(params, avg):
                p.grad = g
            opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("zero", [False, True], ids=["ddp", "zero"])
def test_8bit_states_under_ddp_and_zero(ddp_results, zero):
    """state_bits=8 with DDP and ZeroRedundancyOptimizer (whose consolidated
    checkpoint carries the codes and scales, saved and loaded back, then one
    more step): the replicas stay identical (checked in the workers) and
    equal, bit for bit, the same 8-bit training in one process."""
    ours = ddp_results["fusedoptim", zero, 8]
    ref = _reference_8bit(11 if zero else 10)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def _fsdp_worker(rank, world, port, runs, out):
    """Each of ``runs``, ``(impl, bits)``, in turn in one process group."""
    _init_worker(rank, world, port)
    try:
        for impl, bits in runs:
            _fsdp_train(rank, world, impl, f"{out}-{impl}-{bits}.pt", bits)
    finally:
        dist.destroy_process_group()


def _fsdp_train(rank, world, impl, out, bits):
    """5 AdamW steps of a small MLP whose Linears are FSDP2-sharded; rank 0
    saves the full params and the backends used to ``out``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    # One Linear alone: a group of exactly one DTensor param is the case
    # where nothing else would keep it off the kernels.
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lib = fusedoptim if impl == "fusedoptim" else torch.optim
    params = list(model.parameters())
    opt = lib.AdamW([{"params": [p]} for p in params], lr=1e-2, weight_decay=0.1, **(BITS8 if bits else {}))
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(5):
        loss = model(torch.randn(16, 8, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    full = [p.full_tensor().detach().clone() for p in params]
    if rank == 0:
        backends = opt.last_backends if impl == "fusedoptim" else None
        torch.save({"params": full, "backends": backends}, out)
    # Both ranks leave together: a rank that tears gloo down while its
    # peer still has a transfer in flight can abort the peer's process.
    dist.barrier()


#: Every FSDP2 run of this module: (optimizer, state_bits).
_FSDP_RUNS = [("fusedoptim", None), ("torch", None), ("fusedoptim", 8)]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    """Rank 0's full params and backends of every run in ``_FSDP_RUNS``, in one spawn."""
    if not FSDP2:
        pytest.skip(NO_FSDP2)
    out = str(tmp_path_factory.mktemp("fsdp") / "params")
    _spawn(_fsdp_worker, (_FSDP_RUNS, out))
    return {run: torch.load(f"{out}-{run[0]}-{run[1]}.pt") for run in _FSDP_RUNS}


@pytest.mark.skipif(not FSDP2, reason=NO_FSDP2)
def test_fsdp2_dtensor_params_with_8bit_states(fsdp_results):
    """FSDP2 with state_bits=8: the kernels take the DTensor params, each rank
    quantizing its local shard (blocks over the shard), and the result
    equals, bit for bit, the shards updated as separate tensors in one
    process."""
    ours = fsdp_results["fusedoptim", 8]
    assert ours["backends"] == ["native-cpu/" + fusedoptim.get_cpu_isa()] * 4
    for a, b in zip(ours["params"], _reference_8bit(5, shards=2)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not FSDP2, reason=NO_FSDP2)
def test_fsdp2_dtensor_params_match_torch(fsdp_results):
    results = {impl: fsdp_results[impl, None] for impl in ("fusedoptim", "torch")}
    # DTensor params: the native kernels update their local shards.
    assert results["fusedoptim"]["backends"] == ["native-cpu/" + fusedoptim.get_cpu_isa()] * 4
    for a, b in zip(results["fusedoptim"]["params"], results["torch"]["params"]):
        torch.testing.assert_close(a, b, **FP32_VS_TORCH)
