"""Mask schedules through the binding (the C tests cpu_mask_schedule cover the
library): a selected step's thresholds and bitmap, given back to another
model, reproduce it bit for bit; the layout is word-aligned per tensor."""

import numpy as np
import pytest

import gmtk


def make_model(seed):
    rng = np.random.default_rng(seed)
    grads = [np.round(rng.standard_normal(n) * 32).astype(np.float32) / 32 for n in (100, 7, 64)]
    params = [np.full(g.size, 0.5, np.float32) for g in grads]
    state = [(np.zeros(g.size, np.float32), np.zeros(g.size, np.float32)) for g in grads]
    tensors = [gmtk.Tensor(g, param=p, exp_avg=m, exp_avg_sq=v) for g, p, (m, v) in zip(grads, params, state)]
    return params, tensors


def test_thresholds_and_bitmap_given_back_reproduce_the_selection():
    handle = gmtk.Handle(gmtk.Backend.CPU_REFERENCE)
    group = gmtk.GroupConfig(mask_ratio=0.7)
    models = [make_model(1) for _ in range(3)]
    plans = [gmtk.Plan(handle, [group], tensors) for _, tensors in models]
    assert plans[0].usable  # gmtkPlanGetState: no sticky CUDA error on a CPU plan
    assert plans[0].mask_words == 4 + 1 + 2
    assert plans[0].mask_word_offsets == [0, 4, 5]

    thresholds = np.zeros(3, np.float32)
    bits = np.full(plans[0].mask_words, 0xFFFFFFFF, np.uint32)
    plans[0].step(thresholds=thresholds, mask_bits=bits)
    plans[1].step(given_thresholds=thresholds)
    plans[2].step(given_mask_bits=bits)
    for selected, by_threshold, by_bits in zip(models[0][0], models[1][0], models[2][0]):
        assert selected.view(np.uint32).tolist() == by_threshold.view(np.uint32).tolist()
        assert selected.view(np.uint32).tolist() == by_bits.view(np.uint32).tolist()
    # Bits past the 7-entry tensor's end are written 0.
    assert bits[4] >> 7 == 0


def test_a_score_chooses_the_mask():
    handle = gmtk.Handle(gmtk.Backend.CPU_REFERENCE)
    group = gmtk.GroupConfig(mask_ratio=0.5)
    grad = np.arange(1, 9, dtype=np.float32)           # |g| ascending
    score = np.arange(8, 0, -1).astype(np.float32)     # the opposite order
    bits = np.zeros(1, np.uint32)
    with gmtk.Plan(handle, [group], [gmtk.Tensor(grad, score=score)]) as plan:
        plan.mask_gradients(mask_bits=bits)
    assert grad.tolist() == [1, 2, 3, 4, 0, 0, 0, 0]   # the score's top half kept
    assert int(bits[0]) == 0b00001111


def test_cuda_schedules_match_the_cpu_reference():
    """Every mask schedule on the CUDA backend (torch CUDA tensors, the
    default stream) against the CPU reference fed the same bytes: thresholds,
    bitmaps, kept counts and parameters bit for bit."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA backend's schedules are unverified here")
    rng = np.random.default_rng(7)
    sizes = (1000, 7, 333)
    grads = [np.round(rng.standard_normal(n) * 64).astype(np.float32) / 64 for n in sizes]
    scores = [np.abs(rng.standard_normal(n)).astype(np.float32) for n in sizes]

    def run(backend, call_kwargs, with_score):
        to = (lambda a: torch.from_numpy(a.copy()).cuda()) if backend == gmtk.Backend.CUDA else (lambda a: a.copy())
        params = [to(np.full(n, 0.5, np.float32)) for n in sizes]
        tensors = [
            gmtk.Tensor(to(g), param=p, exp_avg=to(np.zeros(g.size, np.float32)),
                        exp_avg_sq=to(np.zeros(g.size, np.float32)), score=to(s) if with_score else None)
            for g, s, p in zip(grads, scores, params)
        ]
        plan = gmtk.Plan(gmtk.Handle(backend), [gmtk.GroupConfig(mask_ratio=0.8, mask_mode=gmtk.MaskMode.FREEZE)],
                         tensors)
        outputs = dict(thresholds=to(np.zeros(len(sizes), np.float32)), kept_counts=to(np.zeros(len(sizes), np.int64)),
                       mask_bits=to(np.full(plan.mask_words, 0xFFFFFFFF, np.uint32)))
        given = {key: to(value) for key, value in call_kwargs.items()}
        plan.step(**outputs, **given)
        if backend == gmtk.Backend.CUDA:
            torch.cuda.synchronize()
            host = lambda a: a.cpu().numpy()
        else:
            host = lambda a: a
        return ([host(p).view(np.uint32).tolist() for p in params],
                {key: host(value).view(np.uint32 if key != "kept_counts" else np.int64).tolist()
                 for key, value in outputs.items()})

    selected_bits = None
    for case in ("selected", "score", "given_thresholds", "given_mask_bits"):
        kwargs = {}
        if case == "given_thresholds":
            kwargs["given_thresholds"] = np.array([0.25, 1.0 / 3.0, -1.0], np.float32)
        if case == "given_mask_bits":
            kwargs["given_mask_bits"] = selected_bits
        cpu = run(gmtk.Backend.CPU_REFERENCE, kwargs, case == "score")
        cuda = run(gmtk.Backend.CUDA, kwargs, case == "score")
        assert cuda == cpu, case
        if case == "selected":
            selected_bits = np.array(cpu[1]["mask_bits"], np.uint32)
