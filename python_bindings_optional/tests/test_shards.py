"""Sharded plans from Python: ranks as threads with gmtk.Comm.in_process, numpy
slices on the CPU reference backend, against one unsharded plan (the C tests
cpu_shards and cpu_reduction cover the library; this covers the binding:
shard fields, the communicator's lifetime, the GIL released during
collectives, gradient_reduction)."""

import threading

import numpy as np
import pytest

import gmtk


def run_ranks(count, body):
    """Runs body(rank) on `count` threads; re-raises the first failure."""
    errors = []

    def guarded(rank):
        try:
            body(rank)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(r,)) for r in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a rank did not return (deadlock?)"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("scope", [gmtk.Scope.PER_TENSOR, gmtk.Scope.GLOBAL])
def test_sharded_thresholds_equal_unsharded(ranks, scope):
    rng = np.random.default_rng(ranks)
    sizes = [1000, 37, 5]
    grads = [np.round(rng.standard_normal(n) * 64).astype(np.float32) / 64 for n in sizes]
    handle = gmtk.Handle(gmtk.Backend.CPU_REFERENCE)
    group = gmtk.GroupConfig(mask_ratio=0.9, scope=scope)

    want_t = np.zeros(len(sizes), np.float32)
    want_k = np.zeros(len(sizes), np.int64)
    with gmtk.Plan(handle, [group], [gmtk.Tensor(g) for g in grads]) as plan:
        plan.select_thresholds(thresholds=want_t, kept_counts=want_k)

    comms = gmtk.Comm.in_process(ranks)
    assert [c.rank for c in comms] == list(range(ranks))
    assert all(c.size == ranks for c in comms)
    got = [(np.zeros(len(sizes), np.float32), np.zeros(len(sizes), np.int64)) for _ in range(ranks)]

    def rank_body(r):
        tensors = []
        for g in grads:
            cuts = np.linspace(0, g.size, ranks + 1).astype(int)
            tensors.append(gmtk.Tensor(g[cuts[r]:cuts[r + 1]], logical_numel=g.size, shard_offset=int(cuts[r])))
        with gmtk.Plan(handle, [group], tensors, comm=comms[r]) as plan:
            plan.select_thresholds(thresholds=got[r][0], kept_counts=got[r][1])

    run_ranks(ranks, rank_body)
    for thresholds, kept in got:
        assert thresholds.view(np.uint32).tolist() == want_t.view(np.uint32).tolist()
        assert kept.tolist() == want_k.tolist()


def test_gradient_reduction_averages_replicas():
    ranks = 3
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(100).astype(np.float32) for _ in range(ranks)]
    expected = grads[0].copy()
    for g in grads[1:]:
        expected = expected + g  # fp32, rank order
    expected = expected / np.float32(ranks)
    handle = gmtk.Handle(gmtk.Backend.CPU_REFERENCE)
    comms = gmtk.Comm.in_process(ranks)

    def rank_body(r):
        with gmtk.Plan(handle, [gmtk.GroupConfig()], [gmtk.Tensor(grads[r])], comm=comms[r]) as plan:
            plan.select_thresholds(gradient_reduction=gmtk.GradientReduction.AVERAGE)

    run_ranks(ranks, rank_body)
    for g in grads:
        assert g.view(np.uint32).tolist() == expected.astype(np.float32).view(np.uint32).tolist()


def test_gradient_reduction_needs_a_communicator():
    handle = gmtk.Handle(gmtk.Backend.CPU_REFERENCE)
    grad = np.ones(4, np.float32)
    with gmtk.Plan(handle, [gmtk.GroupConfig()], [gmtk.Tensor(grad)]) as plan:
        with pytest.raises(gmtk.InvalidArgumentError, match="gradient_reduction"):
            plan.select_thresholds(gradient_reduction=gmtk.GradientReduction.SUM)


def test_a_shard_without_a_communicator_is_refused():
    handle = gmtk.Handle(gmtk.Backend.CPU_REFERENCE)
    with pytest.raises(gmtk.InvalidArgumentError, match="comm"):
        gmtk.Plan(handle, [gmtk.GroupConfig()], [gmtk.Tensor(np.ones(4, np.float32), logical_numel=8)])
