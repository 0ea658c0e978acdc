"""``python -m mpips.bench``: a tiny smoke run of every benchmark under mpirun, checking that the
JSON has the documented fields with positive numbers, and the pure helpers. No test asserts a
timing: this machine's speed is not the code's behaviour."""

from __future__ import annotations

import json
import math

import pytest
from helpers import run_mpi

from mpips.bench.common import BenchError, Spread, format_table, parse_sizes
from mpips.bench.train import DEFAULT_SYSTEMS, _add_ratios, _throughput, _time_to_target

# generous: a guard against hangs on a loaded 2-core machine, not a performance bound
pytestmark = pytest.mark.timeout(300)

TINY = [
    "--reps", "2", "--warmup", "1", "--threads", "1",
    "--sizes", "1M", "--servers", "1,2",
    "--params", "100K", "--mem-params", "1M", "--mem-optimizers", "adam",
    "--models", "mlp,gpt", "--workers", "1,2", "--steps", "8", "--warmup-steps", "2",
    "--train-reps", "1", "--batch-size", "4", "--hidden", "32",
    "--gpt-layers", "1", "--gpt-width", "16", "--gpt-context", "8",
    "--data-args", "--size-mb 2 --batch-size 16",
]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = run_mpi(3, ["-m", "mpips.bench", "all", *TINY, "--json", str(out)],
                     timeout=240, check=True)
    return json.loads(out.read_text()), result.stdout


def test_all_records_the_machine(bench_all):
    doc, _ = bench_all
    m = doc["machine"]
    assert m["ranks"] == 3 and m["torch_threads"] == 1
    assert positive(m["cores"]) and "MPI" in m["mpi_library"]
    assert m["mpi4py"] and m["torch"]


def test_rma_rows_have_every_rate_and_ratio(bench_all):
    doc, stdout = bench_all
    rows = doc["rma"]
    assert [(r["bytes"], r["servers"]) for r in rows] == [(1_000_000, 1), (1_000_000, 2)]
    for r in rows:
        for key in ("mpips_gbps", "raw_get_gbps", "isend_gbps", "memcpy_gbps",
                    "ratio_vs_raw_get", "ratio_vs_memcpy", "ratio_vs_isend"):
            assert positive(r[key]), (key, r)
        assert r["ratio_vs_raw_get"] == pytest.approx(r["mpips_gbps"] / r["raw_get_gbps"])
        s = r["spread"]["mpips_gbps"]
        assert s["min"] <= s["median"] <= s["max"] and s["reps"] == r["reps"]
    assert "x raw Get" in stdout


def test_apply_rows_cover_each_optimizer(bench_all):
    doc, stdout = bench_all
    rows = doc["apply"]
    assert [r["optimizer"] for r in rows] == ["sgd", "momentum", "adam"]
    for r in rows:
        for key in ("params_per_s", "gbps_touched", "copy_gbps", "ratio_vs_copy",
                    "server_params_per_s", "server_ratio_vs_copy"):
            assert positive(r[key]), (key, r)
        assert r["params"] == 100_000
    assert "x copy" in stdout


def test_train_rows_compare_every_system_at_equal_workers(bench_all):
    doc, stdout = bench_all
    rows = doc["train"]
    got = {(r["model"], r["system"], r["workers"]) for r in rows}
    assert got == {(m, s, w) for m in ("mlp", "gpt") for s in DEFAULT_SYSTEMS for w in (1, 2)}
    for r in rows:
        assert positive(r["samples_per_s"]) and positive(r["ratio_vs_ddp"])
        assert positive(r["ratio_vs_allreduce"]) and positive(r["efficiency"])
        assert r["ranks"] == r["workers"] + (1 if r["system"].startswith("mpips") else 0)
        assert r["data_servers"] == 0 and r["threads"] == 1
    for r in rows:
        if r["system"] == "ddp":
            assert r["ratio_vs_ddp"] == 1.0
        if r["workers"] == 1:
            assert r["efficiency"] == 1.0
    assert "x DDP" in stdout and "efficiency" in stdout and "x fit" in stdout
    # the own loop (job.optimizer with the baselines' loop) trains what fit's bsp trains, and says how fast
    by = {(r["model"], r["system"], r["workers"]): r for r in rows}
    for (model, system, w), r in by.items():
        if system == "mpips-own":
            fit = by[(model, "mpips-bsp", w)]
            assert r["ratio_vs_fit"] == pytest.approx(r["samples_per_s"] / fit["samples_per_s"])
            assert r["final_loss"] == pytest.approx(fit["final_loss"], rel=1e-3)
    # progress, off a terminal: one line per run, counted against all of them, with the time left
    runs = len(rows)  # --train-reps 1
    lines = [line for line in stdout.splitlines() if line.startswith("train run ")]
    assert [line.split()[2] for line in lines] == [f"{k}/{runs}" for k in range(1, runs + 1)]
    assert all(", left about " in line and " s" in line for line in lines)


def test_data_benchmark_is_part_of_all(bench_all):
    doc, _ = bench_all
    data = doc["data"]
    if "skipped" in data:
        pytest.skip(data["skipped"])
    for key in ("raw_samples_per_s", "server_samples_per_s", "worker_samples_per_s"):
        assert positive(data[key]), (key, data)


def test_rma_on_one_rank_says_how_many_it_needs():
    result = run_mpi(1, ["-m", "mpips.bench", "rma", "--sizes", "1M"], timeout=60)
    assert result.returncode == 2
    assert "rma needs at least 2 ranks" in result.stderr


# -- pure helpers ---------------------------------------------------------------------------------

def test_spread_quartiles_and_monotonic_transform():
    s = Spread.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.reps) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    inv = s.scaled(lambda t: 10 / t)  # seconds -> rate: the ends swap
    assert (inv.min, inv.max, inv.median) == (2.0, 10.0, pytest.approx(10 / 3))
    assert Spread.of([7.0]).q1 == Spread.of([7.0]).q3 == 7.0


def test_parse_sizes_units_and_errors():
    assert parse_sizes("1M, 100M,1G,2K") == [1_000_000, 100_000_000, 1_000_000_000, 2000]
    assert parse_sizes("10") == [10_000_000]
    with pytest.raises(BenchError, match="cannot read size"):
        parse_sizes("lots")


def test_throughput_counts_samples_after_the_warmup_window():
    # two workers, 4 steps of 10 samples each, one step per second, worker 1 half a second late
    records = [[(s, float(s), 10, 1.0) for s in range(1, 5)],
               [(s, s + 0.5, 10, 1.0) for s in range(1, 5)]]
    # window from the later worker's step 1 (1.5 s) to the last step (4.5 s): 3 s;
    # steps ending after 1.5 s: 3 of worker 0 and 3 of worker 1
    assert _throughput(records, warmup=1) == pytest.approx(60 / 3.0)


def test_time_to_target_uses_the_moving_mean_of_worker_0():
    losses = [3, 2, 1, 1, 1, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]
    records = [[(i + 1, float(i), 1, loss) for i, loss in enumerate(losses)]]
    # mean of the last 5 is first <= 0.5 at step index 9 (0.4 x 5): 9 s after step 1 ended
    assert _time_to_target(records, 0.5) == pytest.approx(9.0)
    assert _time_to_target(records, 0.1) is None


def test_ratios_pair_rows_of_the_same_model_and_worker_count():
    rows = [{"model": "m", "system": s, "workers": w, "samples_per_s": v}
            for s, w, v in [("ddp", 1, 10.0), ("ddp", 2, 16.0), ("allreduce", 1, 5.0),
                            ("allreduce", 2, 8.0), ("mpips-bsp", 2, 20.0)]]
    _add_ratios(rows)
    bsp = rows[-1]
    assert bsp["ratio_vs_ddp"] == 20 / 16 and bsp["ratio_vs_allreduce"] == 20 / 8
    assert bsp["efficiency"] is None  # no one-worker mpips-bsp row
    assert rows[1]["efficiency"] == 16 / (2 * 10)


def test_format_table_prints_missing_values_as_dashes():
    text = format_table("t", ["a", "b"], [[1.23456, None], [12345.6, float("nan")]])
    assert "1.23" in text and "12,346" in text and text.count("-") > 2


def test_memory_rows_give_every_role_above_a_bare_process(bench_all):
    doc, stdout = bench_all
    rows = doc["memory"]
    assert sorted(r["role"] for r in rows) == ["server", "worker", "worker"]
    for r in rows:
        assert r["optimizer"] == "adam" and r["workers"] == 2 and 0.9e6 <= r["params"] <= 1.1e6
        assert r["peak_rss_bytes"] > r["baseline_rss_bytes"] > 0
        assert r["bytes_per_param"] == pytest.approx((r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / r["params"])
        assert positive(r["expected_bytes_per_param"])
    assert "memory: peak RSS above a bare process" in stdout


def test_compress_dgc_row_is_measured_against_float32_on_its_own_optimizer():
    """``compress``: the DGC row runs top-k with momentum correction and warm-up on momentum SGD,
    and its ratios and deltas are against float32 on momentum SGD, not against adam's float32."""
    import argparse

    from mpips.bench.compress import _add_ratios as add_compress_ratios
    from mpips.bench.compress import _argv, _settings
    from mpips.config import parse_args

    args = argparse.Namespace(codecs="topk", pull_codecs="bf16", dgc=True, dgc_lr=0.1, dgc_warmup=92,
                              compress_ratio=0.01, qsgd_levels=8, threads=1, mlp_epochs=30.0)
    assert _settings(args, "mlp")[-2:] == [("none", "fp32", "momentum"), ("topk", "fp32", "dgc")]
    assert all(v == "" for _, _, v in _settings(args, "gpt"))
    cfg = parse_args(_argv(args, "mlp", "topk", "fp32", "m.jsonl", "m.pt", "dgc"))
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.server_optim().optimizer) == ("momentum", 0.1, "sgd")
    assert cfg.compression.momentum_correction and cfg.compression.sparsity_warmup == 92

    def row(push, optimizer, accuracy, push_bytes):
        return {"model": "mlp", "push": push, "pull": "fp32", "optimizer": optimizer, "accuracy": accuracy,
                "loss": 0.1, "push_bytes_per_step": push_bytes, "pull_bytes_per_step": 100.0, "samples_per_s": 10.0}

    rows = [row("none", "adam", 0.986, 100.0), row("none", "momentum", 0.989, 100.0),
            row("topk", "momentum", 0.983, 5.0)]
    add_compress_ratios(rows)
    assert rows[2]["accuracy_delta"] == pytest.approx(-0.006) and rows[2]["push_ratio"] == pytest.approx(20.0)


def test_straggler_rows_time_every_system_to_the_target_and_compare_with_bsp(tmp_path):
    from mpips.bench.straggler import SYSTEMS

    out = tmp_path / "straggler.json"
    result = run_mpi(3, ["-m", "mpips.bench", "straggler", "--workers", "2", "--slow", "1.0,3.0", "--reps", "1",
                         "--warmup", "0", "--steps", "30", "--hidden", "64", "--batch-size", "32",
                         "--target-accuracy", "0.5", "--target-loss", "2.0", "--json", str(out)],
                     timeout=280, check=True)
    rows = json.loads(out.read_text())["straggler"]
    assert "straggler: seconds to held-out accuracy 0.5" in result.stdout
    assert {(r["system"], r["slow"]) for r in rows} == {(s, f) for s in SYSTEMS for f in (1.0, 3.0)}
    for r in rows:
        assert {"system", "workers", "slow", "time_to_target_s", "final_metric", "ratio_vs_bsp",
                "time_to_loss_target_s", "late", "reached_target"} <= r.keys()
        assert r["workers"] == 2 and r["reached_target"] == "1/1", r
        assert positive(r["time_to_target_s"]) and 0.0 < r["final_metric"] <= 1.0  # a tiny run may end below
        if r["system"] == "mpips-bsp":
            assert r["ratio_vs_bsp"] == 1.0 and r["late"] == 0
        else:
            assert positive(r["ratio_vs_bsp"])
        if r["system"].startswith("mpips-asp") or r["system"] == "mpips-ssp":
            assert r["late"] == 0


def test_sparse_moves_the_touched_rows_and_the_dense_path_the_whole_table(tmp_path):
    """``sparse`` at a small size: every system has a rate; mpips-sparse moves at most 2 x the
    unique rows (keys included) plus the dense parameters per step, the dense path the table."""
    out = tmp_path / "sparse.json"
    run_mpi(4, ["-m", "mpips.bench", "sparse", "--reps", "1", "--sparse-steps", "5", "--sparse-keys", "20000",
                "--json", str(out)], timeout=240, check=True)
    rows = {r["system"]: r for r in json.loads(out.read_text())["sparse"]}
    assert set(rows) == {"torch-sparse", "mpips-sparse", "mpips-dense"}
    assert all(positive(r["samples_per_s"]) and positive(r["ratio_vs_torch"]) for r in rows.values())
    sparse, dense = rows["mpips-sparse"], rows["mpips-dense"]
    assert sparse["unique_rows"] == dense["unique_rows"] and positive(sparse["unique_rows"])
    assert sparse["ratio_to_bound"] <= 1.0, sparse
    assert sparse["bytes_per_row"] <= 2 * (4 * 16 + 8), sparse
    assert dense["sparse_bytes"] == 0 and dense["dense_bytes"] >= 2 * 20000 * 16 * 4  # the whole table both ways
