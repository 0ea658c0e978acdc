"""The codecs of ``mpips.compression``: round trips and their error bounds, bytes per codec,
unbiasedness (qsgd, randomk), error feedback keeping every gradient's mass, and validation that
refuses malformed payloads (fuzzed). Plain pytest, no MPI."""

from __future__ import annotations

import json
import math
import re
import struct

import h5py
import numpy as np
import pytest
import torch
from helpers import run_train
from hypothesis import given, settings
from hypothesis import strategies as st

from mpips.compression import (
    CODECS,
    RECORD_BYTES,
    ErrorFeedback,
    MomentumCorrection,
    PayloadError,
    chunk_ranges,
    chunk_seed,
    make_codec,
    make_encoder,
    parse_payload,
    payload_bound,
    sparsity_ratio,
)
from mpips.transport import HEADER_BYTES, Codec

N = 1000


def _x(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_wire_ids_are_the_push_header_codecs():
    for name in CODECS[1:]:
        assert Codec[name.upper()] == make_codec(name).wire_id


@pytest.mark.parametrize(
    ("name", "body"),
    [("fp16", 2 * N), ("bf16", 2 * N), ("topk", 10 * 6 + 4), ("randomk", 10 * 4), ("qsgd", 4 * 2 + N),
     ("sign", N // 8)],
)
def test_record_bytes(name, body):
    """16-byte record header + the body, padded to 4 bytes; topk 1% with uint16 indices."""
    record = make_codec(name, ratio=0.01).encode(_x(), seed=1)
    assert record.nbytes == RECORD_BYTES + (body + 3) // 4 * 4


def test_topk_sends_6_bytes_per_entry_and_a_count_per_65536_elements():
    n = 3 * 2**16 + 5  # 4 blocks
    x = _x(n)
    codec = make_codec("topk", ratio=0.001)
    record = codec.encode(x, seed=0)
    k = math.ceil(0.001 * n)
    assert record.nbytes == RECORD_BYTES + (6 * k + 4 * 4 + 3) // 4 * 4
    y = codec.roundtrip(x)
    kept = y != 0
    assert int(kept.sum()) == k and torch.equal(y[kept], x[kept])
    assert x[kept].abs().min() >= x[~kept].abs().max()


@pytest.mark.parametrize(("name", "bound"), [("fp16", 2**-11), ("bf16", 2**-8)])
def test_half_precision_round_trip_is_within_rounding(name, bound):
    x = _x()
    y = make_codec(name).roundtrip(x)
    assert torch.all((y - x).abs() <= bound * x.abs())


def test_fp16_saturates_instead_of_overflowing():
    y = make_codec("fp16").roundtrip(torch.tensor([1e6, -1e6, 1.0]))
    assert y.tolist() == [65504.0, -65504.0, 1.0]


def test_topk_keeps_exactly_the_largest_entries():
    x = _x()
    y = make_codec("topk", ratio=0.05).roundtrip(x)
    kept = y != 0
    assert int(kept.sum()) == 50
    assert torch.equal(y[kept], x[kept])  # values exact
    assert x[kept].abs().min() >= x[~kept].abs().max()


def test_sign_sends_the_sign_scaled_by_the_mean_magnitude():
    x = _x()
    y = make_codec("sign").roundtrip(x)
    scale = float(x.abs().mean())
    assert torch.allclose(y, torch.where(x >= 0, scale, -scale))


def test_qsgd_error_is_within_one_level_of_its_buckets_norm():
    x = _x()
    x[512:] *= 100  # two buckets (512 + 488 elements) of very different norms
    y = make_codec("qsgd", levels=8).roundtrip(x, seed=3)
    for lo, hi in ((0, 512), (512, N)):
        norm = float(x[lo:hi].norm())
        assert torch.all((y[lo:hi] - x[lo:hi]).abs() <= norm / 8 * (1 + 1e-6))
    assert torch.all(torch.sign(y) * torch.sign(x) >= 0)  # never flips a sign


@pytest.mark.parametrize("name", ["qsgd", "randomk"])
def test_unbiased_codecs_average_to_the_input(name):
    """Mean of 2000 encodings with different chunk seeds: within 5 standard errors of x."""
    x = _x(64)
    codec = make_codec(name, ratio=0.25, levels=2)
    draws = torch.stack([codec.roundtrip(x, seed=chunk_seed(0, s, 0, 0, 0)) for s in range(2000)]).double()
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert torch.all((mean - x.double()).abs() <= 5 * stderr + 1e-6)
    # and it is noisy (the test can fail): one draw is far from x
    assert float((draws[0] - x.double()).norm()) > 0.1 * float(x.norm())


def test_randomk_indices_come_from_the_seed_alone():
    """The server regenerates them: same seed, same entries; another seed, others."""
    codec = make_codec("randomk", ratio=0.1)
    x = _x()
    a, b, c = (codec.roundtrip(x, seed=s) != 0 for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c) and int(a.sum()) == 100


def test_randomk_with_error_feedback_sends_values_unscaled():
    x = _x()
    y = make_codec("randomk", ratio=0.1, error_feedback=True).roundtrip(x, seed=1)
    assert torch.equal(y[y != 0], x[y != 0])


@pytest.mark.parametrize("name", [c for c in CODECS if c != "none"])
def test_error_feedback_keeps_every_gradients_mass(name):
    """Over 30 steps and 3 chunks: what was sent plus the residual is the sum of the gradients
    (float64 sums). The residual update rounds in float32: at most 2 roundings of the corrected
    gradient per step, so the bound is 30 x 2 x 2**-24 x its largest magnitude; a lost entry
    would be off by about 1."""
    codec = make_codec(name, ratio=0.02, levels=4, error_feedback=True)
    n, ranges = 900, [(0, 400), (400, 800), (800, 900)]
    ef = ErrorFeedback(codec, n)
    total, sent = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    largest = 0.0
    for step in range(30):
        g = _x(n, seed=step) * (1 + step % 3)
        total += g.double()
        for c, (lo, hi) in enumerate(ranges):
            seed = chunk_seed(0, step, 0, 0, c)
            largest = max(largest, float((g[lo:hi] + ef.residual[lo:hi]).abs().max()))
            record = ef.encode(g[lo:hi], seed, lo)
            sent[lo:hi] += parse_payload(codec, record, [(0, hi - lo)], [seed], 0)[0].dense(
                torch.zeros(hi - lo)).double()
    err = (sent + ef.residual.double() - total).abs().max()
    assert err <= 30 * 2 * 2**-24 * largest
    if name in ("topk", "randomk", "sign"):  # something was held back: the residual is not zero
        assert float(ef.residual.abs().max()) > 0


def test_error_feedback_eventually_sends_a_small_entry():
    """top-k alone never sends an entry that is always small; with error feedback it accumulates."""
    codec = make_codec("topk", ratio=0.5)
    ef = ErrorFeedback(codec, 2)
    g = torch.tensor([1.0, 0.3])
    got = torch.zeros(2)
    for _ in range(10):
        record = ef.encode(g, 0, 0)
        got += parse_payload(codec, record, [(0, 2)], [0], 0)[0].dense(torch.zeros(2))
    assert got[1] > 0 and float(codec.roundtrip(g)[1]) == 0.0


def test_error_feedback_state_round_trips():
    codec = make_codec("sign")
    a, b = ErrorFeedback(codec, N), ErrorFeedback(codec, N)
    a.encode(_x(), 0, 0)
    b.load_state_dict({"residual": a.state_dict()["residual"].clone()})
    x = _x(seed=5)
    assert np.array_equal(a.encode(x, 0, 0), b.encode(x, 0, 0))
    with pytest.raises(ValueError, match="residual of 3 elements"):
        b.load_state_dict({"residual": torch.zeros(3)})


# -- whole payloads and their validation -----------------------------------------------------------
def _payload(name: str, n: int = 300, chunk_bytes: int = 400, runs: int = 2):
    codec = make_codec(name, ratio=0.05, levels=8)
    ranges = chunk_ranges(n, chunk_bytes)
    seeds = [chunk_seed(1, 2, 3, 0, c) for c in range(len(ranges))]
    g = _x(n)
    records = [codec.encode(g[a:b], s) for (a, b), s in zip(ranges, seeds, strict=True)]
    payload = np.concatenate([*records, np.array([1, 0] * (runs // 2), np.uint8)])
    return codec, ranges, seeds, g, payload


@pytest.mark.parametrize("name", [c for c in CODECS if c != "none"])
def test_payload_round_trip_in_chunks_and_its_bound(name):
    codec, ranges, seeds, g, payload = _payload(name)
    assert len(ranges) == 3  # 100 elements per chunk of 400 bytes
    grad, mask = parse_payload(codec, payload, ranges, seeds, 2)
    assert mask.tolist() == [1, 0]
    want = torch.cat([codec.roundtrip(g[a:b], s) for (a, b), s in zip(ranges, seeds, strict=True)])
    assert torch.equal(grad.dense(torch.zeros(300)), want)
    acc = torch.ones(300)
    grad.add_into(acc, alpha=2.0)
    assert torch.allclose(acc, 1 + 2 * want)
    assert payload.size <= payload_bound(codec, ranges, 2)


def _rejects(codec, payload, ranges, seeds, match):
    with pytest.raises(PayloadError, match=match):
        parse_payload(codec, payload, ranges, seeds, 2)


def test_malformed_payloads_are_refused_with_the_reason():
    codec, ranges, seeds, _, payload = _payload("topk")
    rec = RECORD_BYTES + 5 * 6 + 4 + 2  # one chunk's record: 5 values, 1 block count, 5 uint16 indices, padding
    bad = payload.copy()
    struct.pack_into("<I", bad, 0, 99)
    _rejects(codec, bad, ranges, seeds, "chunk 0 .*record for 99 elements")
    bad = payload.copy()
    struct.pack_into("<I", bad, 4, 101)
    _rejects(codec, bad, ranges, seeds, "count 101 is not valid")
    bad = payload.copy()
    struct.pack_into("<f", bad, rec + 12, float("nan"))
    _rejects(codec, bad, ranges, seeds, "chunk 1 .*scale nan")
    bad = payload.copy()
    bad[RECORD_BYTES + 24 : RECORD_BYTES + 26] = np.frombuffer(struct.pack("<H", 100), np.uint8)
    _rejects(codec, bad, ranges, seeds, "indices not ascending inside 0..99")
    bad = payload.copy()
    struct.pack_into("<I", bad, RECORD_BYTES + 20, 4)  # the block count: 4 of the 5 entries
    _rejects(codec, bad, ranges, seeds, "block counts add up to 4, not the 5 entries")
    _rejects(codec, payload[:-3], ranges, seeds, "chunk 2")
    _rejects(codec, np.concatenate([payload[:-2], [0, 0, 0, 0, 1, 0]]).astype(np.uint8), ranges, seeds,
             "records and mask take")
    bad = payload.copy()
    bad[-1] = 7
    _rejects(codec, bad, ranges, seeds, "mask is not 0/1")
    qsgd, ranges, seeds, _, q = _payload("qsgd")
    q[RECORD_BYTES + 4] = 9  # the first level (after one bucket norm): above the 8 announced
    _rejects(qsgd, q, ranges, seeds, "level above the 8 levels")
    struct.pack_into("<f", q, RECORD_BYTES, 1e30)  # a bucket norm above the record's largest
    _rejects(qsgd, q, ranges, seeds, "bucket norms outside")


def test_a_nan_scale_passes_only_when_the_push_says_its_gradient_is_not_finite():
    codec, ranges, seeds, _, payload = _payload("sign")
    struct.pack_into("<f", payload, 12, float("nan"))
    _rejects(codec, payload, ranges, seeds, "scale nan")
    grad, _ = parse_payload(codec, payload, ranges, seeds, 2, finite=False)
    assert not grad.finite()  # the server then drops it as a bad gradient


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([c for c in CODECS if c != "none"]), st.data())
def test_fuzzed_payloads_are_refused_or_decode_to_the_right_shape(name, data):
    """Random byte flips, truncations and extensions of a valid payload: parse_payload either
    raises PayloadError or returns a gradient of the slice's length with a 0/1 mask."""
    codec, ranges, seeds, _, payload = _payload(name)
    raw = bytearray(payload.tobytes())
    for _ in range(data.draw(st.integers(1, 4))):
        what = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if what == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif what == "cut":
            del raw[data.draw(st.integers(0, len(raw))):]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=16))
    buf = np.frombuffer(bytes(raw), np.uint8).copy()
    try:
        grad, mask = parse_payload(codec, buf, ranges, seeds, 2)
    except PayloadError:
        return
    assert grad.dense(torch.zeros(300)).shape == (300,)
    assert set(mask.tolist()) <= {0, 1} and mask.size == 2


def test_make_codec_refuses_bad_settings():
    with pytest.raises(ValueError, match="unknown codec"):
        make_codec("zip")
    with pytest.raises(ValueError, match="ratio 0"):
        make_codec("topk", ratio=0)
    with pytest.raises(ValueError, match="levels 200"):
        make_codec("qsgd", levels=200)
    assert make_codec("none") is None



def test_flags_and_config_files_choose_the_codecs(tmp_path):
    from mpips.config import ConfigError, parse_args

    cfg = parse_args(["--compress", "topk", "--compress-ratio", "0.05"]).compression
    assert (cfg.compress, cfg.compress_ratio, cfg.feedback(), cfg.pull_codec) == ("topk", 0.05, True, "fp32")
    assert not parse_args(["--compress", "topk", "--no-error-feedback"]).compression.feedback()
    assert not parse_args(["--compress", "qsgd"]).compression.feedback()  # unbiased: off by default
    toml = tmp_path / "run.toml"
    toml.write_text('[compression]\ncompress = "sign"\npull-codec = "bf16"\nerror-feedback = false\n')
    cfg = parse_args(["--config", str(toml)]).compression
    assert (cfg.compress, cfg.pull_codec, cfg.feedback()) == ("sign", "bf16", False)
    for argv, message in ((["--compress-ratio", "0"], r"^--compress-ratio must be in \(0, 1\] \(got 0.0\)$"),
                          (["--qsgd-levels", "200"], r"^--qsgd-levels must be between 1 and 127 \(got 200\)$"),
                          (["--compress", "zip"], r"^argument --compress: invalid choice: 'zip'")):
        with pytest.raises(ConfigError, match=message):
            parse_args(argv)

# -- deep gradient compression: sparsity warm-up, momentum correction -------------------------------
def test_sparsity_warmup_is_dgcs_exponential_schedule():
    """ratio 0.25**4 warmed up over 3 steps sends 25%, 6.25%, 1.5625%, then 0.390625% (sparsity 75%,
    93.75%, 98.4375%, 99.6%: the sequence of Lin et al. 2018, Section 4), and the records follow it;
    the largest record (step 0's) is what the buffers are sized for on worker and server."""
    ratio, n = 0.25**4, 4096
    assert [sparsity_ratio(t, ratio, 3) for t in range(6)] == pytest.approx([0.25, 0.0625, 0.015625, *[ratio] * 3])
    assert [sparsity_ratio(t, 0.01, 0) for t in range(2)] == [0.01, 0.01]
    for name in ("topk", "randomk"):
        codec = make_codec(name, ratio=ratio, warmup_steps=3)
        counts = []
        for t in range(5):
            codec.begin_step(t)
            record = codec.encode(_x(n), seed=t)
            counts.append(struct.unpack_from("<I", record, 4)[0])
            assert record.nbytes <= codec.max_record_bytes(n)
        assert counts == [1024, 256, 64, 16, 16]
        codec.begin_step(0)
        assert codec.encode(_x(n), seed=0).nbytes == codec.max_record_bytes(n)
        assert make_codec(name, ratio=ratio).max_record_bytes(n) < codec.max_record_bytes(n)


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_momentum_correction_holds_back_what_torchs_momentum_sgd_would_have_applied(nesterov):
    """Entry 1 always gets a gradient too small to be sent: after 12 steps its velocity holds what
    torch's momentum SGD (lr 1) would have moved it by, sum of its updates. Entry 0, sent every
    step, has its momentum zeroed every step (momentum factor masking) and so sends the gradient
    (Nesterov: with its look-ahead, (1 + m) g)."""
    m, g = 0.9, torch.tensor([1.0, 0.001, -0.002, 0.0005])
    mc = make_encoder(make_codec("topk", ratio=0.25), 4, True, momentum=m, nesterov=nesterov)
    p = torch.zeros(4, requires_grad=True)
    sgd = torch.optim.SGD([p], lr=1.0, momentum=m, nesterov=nesterov)
    for _ in range(12):
        record = mc.encode(g, 0, 0)
        sent = parse_payload(mc.codec, record, [(0, 4)], [0], 0)[0].dense(torch.zeros(4))
        assert sent[1:].tolist() == [0.0, 0.0, 0.0]  # entry 0 only: the others never get that large
        assert float(sent[0]) == pytest.approx(1 + m if nesterov else 1.0)
        p.grad = g.clone()
        sgd.step()
    state = mc.state_dict()
    assert state["momentum"][0] == 0 and state["residual"][0] == 0  # cleared where sent
    torch.testing.assert_close(state["residual"][1:].double(), -p.detach()[1:].double(), rtol=1e-5, atol=0)


def test_momentum_correction_without_momentum_is_error_feedback():
    codec = make_codec("topk", ratio=0.05)
    ef, mc = ErrorFeedback(codec, N), MomentumCorrection(codec, N, momentum=0.0)
    for step in range(5):
        x = _x(seed=step)
        assert np.array_equal(ef.encode(x, step, 0), mc.encode(x, step, 0))
    assert torch.equal(ef.residual, mc.residual)


def test_momentum_correction_state_round_trips_and_needs_a_sparse_codec():
    codec = make_codec("randomk", ratio=0.1, error_feedback=True)
    a, b = MomentumCorrection(codec, N, 0.9), MomentumCorrection(codec, N, 0.9)
    for step in range(3):
        a.encode(_x(seed=step), step, 0)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    x = _x(seed=7)
    assert np.array_equal(a.encode(x, 3, 0), b.encode(x, 3, 0))
    assert float(a.state_dict()["momentum"].abs().max()) > 0
    with pytest.raises(ValueError, match="velocity of 3 elements"):
        b.load_state_dict({"residual": torch.zeros(N), "momentum": torch.zeros(3)})
    b.load_state_dict({"residual": torch.zeros(N)})  # a checkpoint from before: zero momentum
    assert float(b.state_dict()["momentum"].abs().max()) == 0
    with pytest.raises(ValueError, match="needs a sparse codec"):
        MomentumCorrection(make_codec("qsgd"), N, 0.9)
    with pytest.raises(ValueError, match="needs randomk unscaled"):
        MomentumCorrection(make_codec("randomk", ratio=0.1), N, 0.9)


def test_dgc_flags_and_the_combinations_they_refuse(tmp_path):
    from mpips.config import ConfigError, parse_args

    cfg = parse_args(["--compress", "randomk", "--optimizer", "nesterov", "--momentum", "0.8",
                      "--momentum-correction", "--sparsity-warmup", "50"])
    c = cfg.compression
    assert (c.momentum_correction, c.sparsity_warmup, c.feedback()) == (True, 50, True)
    assert c.worker_momentum(cfg.optim) == (0.8, True)
    assert cfg.server_optim().optimizer == "sgd" and cfg.optim.optimizer == "nesterov"
    toml = tmp_path / "dgc.toml"
    toml.write_text('[compression]\ncompress = "topk"\nmomentum-correction = true\nsparsity-warmup = 8\n'
                    '[optim]\noptimizer = "momentum"\n')
    cfg = parse_args(["--config", str(toml)])
    assert cfg.compression.worker_momentum(cfg.optim) == (0.9, False) and cfg.compression.sparsity_warmup == 8
    assert parse_args([]).server_optim() == parse_args([]).optim
    for argv, message in (
        (["--compress", "qsgd", "--momentum-correction", "--optimizer", "momentum"],
         r"^--momentum-correction needs --compress topk or randomk \(got --compress qsgd\): it zeroes"),
        (["--compress", "topk", "--momentum-correction"],
         r"^--momentum-correction moves the momentum of --optimizer momentum or nesterov onto the workers \(the"
         r" servers then apply plain SGD\); --optimizer adam has none to move$"),
        (["--compress", "topk", "--momentum-correction", "--optimizer", "momentum", "--no-error-feedback"],
         r"^--momentum-correction keeps what it did not send in its velocity"),
        (["--compress", "sign", "--sparsity-warmup", "10"], r"^--sparsity-warmup needs --compress topk or randomk"
         r" \(got --compress sign\)"),
        (["--compress", "topk", "--sparsity-warmup", "-1"], r"^--sparsity-warmup must be 0 or more \(got -1\)$"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_args(argv)


# -- end to end (mpirun through tests/helpers.py) ---------------------------------------------------
E2E = ("--data-servers", "0", "--steps", "12", "--log-every", "100", "--stall-timeout", "20")
# as tests/test_checkpoint.py: a frozen layer, a never-called one and BatchNorm buffers
CKPT_FLAGS = (*E2E[:2], "--steps", "14", "--stall-timeout", "10", "--seed", "3", "--log-every", "100",
              "--model", "toymodels:frozen_unused_batchnorm")


def _end_event(path) -> dict:
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return next(e for e in events if e["event"] == "end")


def test_topk_with_error_feedback_pushes_over_50x_fewer_bytes_and_bf16_pulls_half(tmp_path):
    """The default MLP, 2 workers, 12 bsp steps with topk 1% and --pull-codec bf16: every push
    is its header, one topk record (k values, one block count, k uint16 indices) and the tensor mask, against
    header + 4 bytes per element + mask for float32 (``Codec.RAW32``); every pull 2 bytes per
    element instead of 4."""
    result = run_train(3, *E2E, "--compress", "topk", "--pull-codec", "bf16", "--metrics",
                       str(tmp_path / "m.jsonl"), timeout=120, check=True)
    end = _end_event(tmp_path / "m.jsonl")
    runs, n = (int(v.replace(",", "")) for v in re.search(r"shard plan: (\d+) tensors, ([\d,]+) parameters",
                                                          result.stdout).groups())
    pushes, k = 2 * 12, math.ceil(0.01 * n)
    assert end["bytes_pushed"] == pushes * (HEADER_BYTES + RECORD_BYTES + (6 * k + 4 + 3) // 4 * 4 + runs)
    assert pushes * (HEADER_BYTES + 4 * n + runs) / end["bytes_pushed"] >= 50
    assert f"bytes pushed / pulled (all workers)     {end['bytes_pushed']:,} / {2 * n * pushes:,}" in result.stdout
    assert end["bytes_pulled"] == pushes * 2 * n
    assert end["applied"] == 12 and end["dropped"] == 0
    steps = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    steps = [e for e in steps if e["event"] == "step"]
    assert len(steps) == pushes  # per step and worker: that step's bytes, adding up to the totals
    assert {e["step_bytes_pushed"] for e in steps} == {end["bytes_pushed"] // pushes}
    assert {e["step_bytes_pulled"] for e in steps} == {2 * n}
    assert end["loss"] < math.log(10)  # it learned: below chance after 12 steps (bsp: the same every run)


@pytest.mark.parametrize(("codec", "state"), [
    (("--compress", "qsgd", "--error-feedback", "--qsgd-levels", "4"), ("residual",)),
    (("--compress", "topk", "--compress-ratio", "0.05", "--optimizer", "nesterov", "--lr", "0.05",
      "--momentum-correction", "--sparsity-warmup", "12"), ("residual", "momentum")),
], ids=["qsgd-ef", "topk-dgc"])
def test_kill_and_resume_with_compression_is_bitwise_identical(codec, state, tmp_path):
    """bsp, qsgd with error feedback (seeded rounding noise and a residual per worker), and top-k
    with DGC's momentum correction and sparsity warm-up (a velocity and a momentum per worker; the
    fraction sent still falling at the resume): a run SIGKILLed at step 10 and resumed from its
    step-8 checkpoint ends bitwise equal to an uninterrupted one. The worker state is in the
    checkpoint, and not zero."""
    flags = (*CKPT_FLAGS, *codec)
    run_train(3, *flags, "--save", str(tmp_path / "reference.pt"), timeout=120, check=True)
    ck = ("--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "4")
    killed = run_train(3, *flags, *ck, env={"MPIPS_FAULT": "rank=0,phase=pull,step=10,kind=kill"}, timeout=120)
    assert killed.returncode != 0
    with h5py.File(tmp_path / "ck" / "ckpt-00000008.h5", "r") as f:
        saved = {key: f[f"workers/{key}"][:] for key in state}
    for vec in saved.values():
        assert vec.shape[0] == 2 and np.abs(vec).max() > 0
    run_train(3, *flags, *ck, "--resume", "--save", str(tmp_path / "resumed.pt"), timeout=120, check=True)
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("reference.pt", "resumed.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_topk_1_percent_with_dgc_reaches_the_accuracy_target_on_the_default_job(tmp_path):
    """The issue's target for top-k 1%: held-out accuracy within 0.5 point of the default job's
    float32 accuracy (0.986 on this VM, so >= 0.981), on the default job (4 ranks, 30 epochs, seed
    0) with deep gradient compression: momentum correction on momentum SGD (lr 0.1) and the
    sparsity warmed up over the first 4 epochs (92 steps). Measured 0.989 here (3 held-out
    samples above the line; seeds 1 and 2: 0.983); float32 on momentum SGD 0.989, adam 0.986.
    (top-k with adam, no DGC: 0.981, one sample short.) Every push is its header, the record of
    that step's k = ceil(ratio_t x n) entries and the mask: 17x fewer bytes than float32 over the
    run, the warm-up's early pushes being nearly dense, 63x after it."""
    warmup, n_steps, workers = 92, 690, 2
    result = run_train(4, "--optimizer", "momentum", "--lr", "0.1", "--compress", "topk", "--compress-ratio",
                       "0.01", "--momentum-correction", "--sparsity-warmup", str(warmup), "--metrics",
                       str(tmp_path / "m.jsonl"), timeout=600, check=True)
    assert "momentum correction (momentum 0.9 on the workers, plain SGD on the servers)" in result.stdout
    assert "server 0: 26,122 elements (0.10 MiB) + sgd state ~0.00 MiB" in result.stdout + (result.stderr or "")
    end = _end_event(tmp_path / "m.jsonl")
    assert end["step"] == n_steps and end["accuracy"] >= 0.981
    runs, n = (int(v.replace(",", "")) for v in re.search(r"shard plan: (\d+) tensors, ([\d,]+) parameters",
                                                          result.stdout).groups())
    ks = [min(n, max(1, math.ceil(sparsity_ratio(t, 0.01, warmup) * n))) for t in range(n_steps)]
    push = [HEADER_BYTES + RECORD_BYTES + (6 * k + 4 + 3) // 4 * 4 + runs for k in ks]
    assert end["bytes_pushed"] == workers * sum(push)
    assert workers * n_steps * (HEADER_BYTES + 4 * n + runs) / end["bytes_pushed"] >= 15
    assert (HEADER_BYTES + 4 * n + runs) / push[-1] >= 50


@pytest.mark.mpi(min_size=2, sizes=(2,))
@pytest.mark.parametrize("codec", [["--compress", "topk", "--compress-ratio", "0.05"],
                                   ["--compress", "qsgd", "--qsgd-levels", "4", "--error-feedback"],
                                   ["--compress", "topk", "--compress-ratio", "0.05", "--optimizer", "nesterov",
                                    "--lr", "0.05", "--momentum-correction", "--sparsity-warmup", "8"]],
                         ids=["topk-ef", "qsgd-ef", "topk-dgc"])
def test_bsp_equals_single_process_training_with_the_codec_on_the_batch_gradient(codec, tmp_path_factory):
    """1 worker, 1 server: the run ends where plain torch ends when its flat gradient goes, chunk
    by chunk (3 chunks of 10,000 elements), through the same error feedback (or DGC's momentum
    correction and sparsity warm-up, torch then running plain SGD) and codec with the same seeds."""
    from mpi4py import MPI

    from mpips.compression import make_encoder
    from mpips.config import parse_args
    from mpips.data import open_dataset
    from mpips.models import build_model, loss_and_correct
    from mpips.optim import build_optimizer
    from mpips.train import run

    comm = MPI.COMM_WORLD
    out = comm.bcast(str(tmp_path_factory.mktemp("bsp") / "final.pt") if comm.rank == 0 else None, root=0)
    flags = ["--servers", "1", "--data-servers", "0", "--sync", "bsp", "--batch-size", "16", "--steps", "20",
             "--seed", "5", "--chunk-bytes", "40000", "--save", out, *codec]
    assert run(parse_args(flags), comm) == 0
    if comm.rank == 0:
        cfg = parse_args(flags)
        data = open_dataset("digits", None)
        plan = data.plan(1, 16, 5)
        model = build_model(cfg.model, data.spec, 5)
        params = list(model.parameters())
        opt = build_optimizer(params, cfg.server_optim())
        numel = sum(p.numel() for p in params)
        c = cfg.compression
        enc = make_encoder(make_codec(c.compress, c.compress_ratio, c.qsgd_levels, c.feedback(), c.sparsity_warmup),
                           numel, True, *c.worker_momentum(cfg.optim))
        ranges = chunk_ranges(numel, 40000)
        assert len(ranges) == 3
        start = {k: v.clone() for k, v in model.state_dict().items()}
        for step in range(20):
            x, y = data.train.take(plan.global_ids(*plan.position(step)))
            loss, _ = loss_and_correct(model(torch.from_numpy(x)), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            g = torch.cat([p.grad.reshape(-1) for p in params])
            enc.begin_step(step)
            seeds = [chunk_seed(5, step, 0, 0, i) for i in range(len(ranges))]
            sent = torch.cat([parse_payload(enc.codec, enc.encode(g[a:b], seed, a), [(0, b - a)], [seed], 0)[0]
                              .dense(torch.zeros(b - a)) for (a, b), seed in zip(ranges, seeds, strict=True)])
            at = 0
            for p in params:
                p.grad.copy_(sent[at : at + p.numel()].view_as(p))
                at += p.numel()
            opt.step()
        got, want = torch.load(out, weights_only=True), model.state_dict()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=2e-4, atol=2e-5, msg=f"parameter {k}")
        assert any(not torch.allclose(start[k], want[k], atol=1e-3) for k in want)
    comm.Barrier()
