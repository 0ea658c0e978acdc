"""Sparse tables (``job.embedding``): the pure math of ``mpips.sparse``, then whole jobs of
``tests/sparse_cases.py`` under mpirun (2 servers, 2 workers)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, run_mpi
from torch import nn

from mpips.config import ConfigError
from mpips.data.clicks import auc
from mpips.sparse import EmbeddingSpec, RowShard, check_fits, init_rows, local_rows, owner_split, shard_bytes

CASES = REPO / "tests" / "sparse_cases.py"
OPTIMIZERS = {"sgd": (torch.optim.SGD, {"lr": 0.5}), "momentum": (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}),
              "adagrad": (torch.optim.Adagrad, {"lr": 0.1}), "sparseadam": (torch.optim.SparseAdam, {"lr": 0.05})}


# -- the math, one process --------------------------------------------------------------------
def test_seeded_rows_depend_on_seed_table_and_key_only():
    keys = np.arange(10_000)
    rows = init_rows(keys, 8, seed=3, table=0, std=0.5)
    assert rows.dtype == np.float32 and rows.shape == (10_000, 8)
    assert np.array_equal(rows[[7, 4242]], init_rows(np.array([7, 4242]), 8, seed=3, table=0, std=0.5))
    assert not np.array_equal(rows, init_rows(keys, 8, seed=4, table=0, std=0.5))
    assert not np.array_equal(rows, init_rows(keys, 8, seed=3, table=1, std=0.5))
    assert abs(rows.mean()) < 0.01 and abs(rows.std() - 0.5) < 0.01


def test_owner_split_covers_every_key_once_and_balances_rows():
    keys = torch.tensor([0, 5, 6, 9, 12, 13, 99])
    parts = owner_split(keys, 3)
    back = torch.empty_like(keys)
    for s, (where, local) in enumerate(parts):
        back[where] = local * 3 + s
    assert torch.equal(back, keys)
    assert sum(local_rows(1001, s, 3) for s in range(3)) == 1001
    assert [local_rows(1001, s, 3) for s in range(3)] == [334, 334, 333]


def shards(kind: str, table: torch.Tensor, servers: int) -> list[RowShard]:
    cls, kw = OPTIMIZERS[kind]
    spec = EmbeddingSpec.of(len(table), table.shape[1], cls, kw, "given", 1.0)
    return [RowShard(spec, s, servers, table[s::servers].numpy().copy()) for s in range(servers)]


def sharded_step(parts: list[RowShard], keys: torch.Tensor, grads: torch.Tensor, scale: float) -> None:
    for s, (where, local) in enumerate(owner_split(keys, len(parts))):
        parts[s].step([(local, grads[where])], scale)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_shards_step_as_torch_steps_a_sparse_embedding(kind):
    """Three servers' shards, each stepped with its rows of the mean of two workers' row
    gradients, equal one ``nn.Embedding(sparse=True)`` stepped by the same torch optimizer on
    the concatenated batch; untouched rows stay bitwise as they were."""
    torch.manual_seed(0)
    table = torch.randn(50, 4)
    emb = nn.Embedding(50, 4, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(table)
    cls, kw = OPTIMIZERS[kind]
    opt = cls(emb.parameters(), **kw)
    parts, touched = shards(kind, table, 3), set()
    for _step in range(5):
        ids = [torch.randint(0, 25, (6,)) for _ in range(2)]  # rows 25.. are never touched
        targets = [torch.randn(6, 4) for _ in range(2)]
        opt.zero_grad()
        ((emb(torch.cat(ids)) - torch.cat(targets)) ** 2).sum().backward()
        opt.step()
        keys, grads = [], []
        for i, t in zip(ids, targets, strict=True):  # each worker: its unique rows' gradient
            u, inv = torch.unique(i, return_inverse=True)
            rows = table.new_zeros(len(u), 4).index_add_(0, inv, 2 * (shards_rows(parts, i) - t))
            keys.append(u), grads.append(rows)
        for s, p in enumerate(parts):  # each server sums its rows of the two pushes (a sum loss: scale 1)
            mine = []
            for k, g in zip(keys, grads, strict=True):
                on = k % 3 == s
                mine.append((k[on] // 3, g[on]))
            p.step(mine, 1.0)
        touched |= set(torch.cat(ids).tolist())
    got = torch.empty_like(table)
    for s, p in enumerate(parts):
        got[s::3] = p.weight.detach()
    torch.testing.assert_close(got, emb.weight.detach(), rtol=1e-5, atol=1e-6)
    untouched = sorted(set(range(50)) - touched)
    assert torch.equal(got[untouched], table[untouched])


def shards_rows(parts: list[RowShard], ids: torch.Tensor) -> torch.Tensor:
    """The rows of ``ids`` as the shards hold them now."""
    out = torch.empty(len(ids), parts[0].spec.dim)
    for s, (where, local) in enumerate(owner_split(ids, len(parts))):
        out[where] = parts[s].gather(local)
    return out


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_a_shard_restored_from_its_state_dict_steps_on_bitwise(kind):
    torch.manual_seed(1)
    table = torch.randn(30, 4)
    a = shards(kind, table, 2)
    for _ in range(3):
        sharded_step(a, torch.tensor([1, 2, 7, 8, 20]), torch.randn(5, 4), 0.5)
    b = shards(kind, torch.zeros(30, 4), 2)
    for x, y in zip(a, b, strict=True):
        st = x.state_dict()
        y.load_state_dict({**st, "weight": st["weight"].copy(), "elem": {k: v.copy() for k, v in st["elem"].items()}})
    keys, grads = torch.tensor([2, 3, 8, 29]), torch.randn(4, 4)
    sharded_step(a, keys, grads, 0.5), sharded_step(b, keys, grads, 0.5)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.weight, y.weight)


def test_an_optimizer_torch_refuses_sparse_gradients_is_refused_with_torchs_reason():
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        with pytest.raises(ConfigError, match=r"cannot step an embedding table's sparse gradients \(torch: .*sparse"):
            EmbeddingSpec.of(10, 4, cls, {"lr": 0.1}, "seed", 1.0)
    with pytest.raises(ConfigError, match="num_embeddings must be a positive int"):
        EmbeddingSpec.of(0, 4, torch.optim.SGD, {"lr": 0.1}, "seed", 1.0)


def test_a_table_the_servers_cannot_hold_is_refused_with_the_numbers():
    spec = EmbeddingSpec.of(10**9, 16, torch.optim.Adagrad, {"lr": 0.1}, "seed", 1.0)
    need = shard_bytes(spec, 0, 2)
    assert need == local_rows(10**9, 0, 2) * 16 * 4 * 2  # rows and Adagrad's sum
    check_fits([spec], 0, 2, available=2 * need, sharing=2)
    with pytest.raises(ConfigError, match=r"need 59.60 GiB on server 0 .* 119.21 GiB over 2 servers\) and its host has"
                                          r" 100.00 GiB available for 2 server\(s\): use more servers \(at least 3\)"):
        check_fits([spec], 0, 2, available=100 * 2**30, sharing=2)


# -- whole jobs ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["adagrad", "sgd", "sparseadam"])
def test_bsp_with_two_servers_and_two_workers_equals_one_torch_process(tmp_path, kind):
    """A 1,000-row table (its optimizer on the servers) under an SGD head, 20 bsp steps: equal
    to ``nn.Embedding(sparse=True)`` in one torch process on the concatenated batch."""
    run_mpi(4, [str(CASES), f"equal_{kind}", str(tmp_path / "out.pt")], timeout=120, cwd=tmp_path, check=True)
    r = torch.load(tmp_path / "out.pt")
    assert not torch.equal(r["table"], r["ref_table"] * 0 + r["table"][0])  # it trained something
    rel = ((r["table"] - r["ref_table"]).abs().max() / r["ref_table"].abs().max()).item()
    assert rel <= 1e-5, rel
    for k, v in r["ref_head"].items():
        torch.testing.assert_close(r["head"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sync", ["bsp", "asp", "ssp"])
def test_seeded_rows_train_in_every_sync_mode_and_untouched_rows_keep_their_seeded_values(tmp_path, sync):
    """Rows no batch touched are bitwise the seeded values the test computes itself; the rows
    worker 0's batches touched have moved by the time it exports the table (in asp and ssp,
    the other worker's last pushes may still be on their way)."""
    run_mpi(4, [str(CASES), "seeded", str(tmp_path / "out.pt"), json.dumps({"sync": sync})], timeout=120,
            cwd=tmp_path, check=True)
    r = torch.load(tmp_path / "out.pt")
    seeded = torch.from_numpy(init_rows(np.arange(1000), 8, r["seed"], 0, 0.5))
    touched = torch.zeros(1000, dtype=torch.bool)
    touched[torch.cat(r["touched"])] = True
    assert torch.equal(r["table"][~touched], seeded[~touched])
    moved = r["touched"][0] if sync != "bsp" else torch.cat(r["touched"]).unique()
    assert (r["table"][moved] != seeded[moved]).any(dim=1).all()
    assert torch.isfinite(r["table"]).all()


@pytest.mark.parametrize("case, line", [
    ("bad_range", r"mpips: bad configuration on rank 1 \(host \S+, worker 1\): embedding emb: id 1000 is out of range"
                  r" for a table of 1,000 rows \(ids 0 \.\. 1000; valid 0 \.\. 999\)"),
    ("bad_negative", r"mpips: bad configuration on rank [01] \(host \S+, worker [01]\): embedding emb: id -4 is out of"
                     r" range for a table of 1,000 rows"),
    ("bad_float", r"mpips: bad configuration on rank [01] \(host \S+, worker [01]\): embedding emb: ids must be an"
                  r" integer tensor \(torch.long\), got torch.float32"),
    ("bad_optimizer", r"mpips: bad configuration on rank [01] \(host \S+, worker [01]\): job.embedding: Adam cannot"
                      r" step an embedding table's sparse gradients \(torch: Adam does not support sparse gradients"),
    ("dense_adam", r"mpips: bad configuration: emb is an Embedding\(sparse=True\), and Adam cannot step its sparse"
                   r" gradients \(torch: Adam does not support sparse gradients, please consider SparseAdam instead\):"
                   r" hold the table on the servers with job.embedding\(...\), or use sparse=False"),
    ("too_large", r"mpips: bad configuration: the sparse tables need [\d.]+ GiB on server 0 \(rows and optimizer"
                  r" state: [\d.]+ GiB over 2 servers\) and its host has [\d.]+ GiB available for 2 server\(s\): use"
                  r" more servers \(at least \d+\) or a smaller table"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, line):
    out = run_mpi(4, [str(CASES), case], timeout=60, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    said = [s for s in out.stderr.splitlines() if s.startswith("mpips:")]
    assert said and re.match(line, said[0]), out.stderr
    assert len(said) == len({re.sub(r"\(host .*", "", s) for s in said}) <= 2, said  # at most one line per worker
    assert "Traceback" not in out.stderr


def test_kill_9_and_resume_is_bitwise_with_the_tables_optimizer_state(tmp_path):
    """Adagrad on the table (its sums in the checkpoint), checkpoints every 5 steps, worker 0
    killed with SIGKILL after step 12; resumed from step 10: the table and head end bitwise as an
    uninterrupted run's."""
    run_mpi(4, [str(CASES), "resume", str(tmp_path / "full.pt")], timeout=120, cwd=tmp_path, check=True)
    ck = {"checkpoint_dir": str(tmp_path / "ck"), "checkpoint_every": 5}
    killed = run_mpi(4, [str(CASES), "resume", str(tmp_path / "res.pt"), json.dumps({**ck, "kill_at": 12})],
                     timeout=120, cwd=tmp_path)
    assert killed.returncode != 0 and not (tmp_path / "res.pt").exists()
    resumed = run_mpi(4, [str(CASES), "resume", str(tmp_path / "res.pt"), json.dumps({**ck, "resume": "latest"})],
                      timeout=120, cwd=tmp_path, check=True)
    assert "at step 10" in resumed.stderr, resumed.stderr
    full, again = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "res.pt")
    assert torch.equal(full["table"], again["table"])
    assert all(torch.equal(full["head"][k], again["head"][k]) for k in full["head"])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_20m_row_table_trains_with_worker_memory_growing_at_most_128_mib(tmp_path):
    """20 M x 16 float32 (1.2 GiB) seeded on two servers; a worker holds only its batches' rows."""
    run_mpi(4, [str(CASES), "big", str(tmp_path / "mem.json")], timeout=240, cwd=tmp_path, check=True)
    mem = json.loads((tmp_path / "mem.json").read_text())
    assert mem["peak_mib"] - mem["rss_before_mib"] <= 128, mem


def test_the_click_log_and_the_dlrm_example_reach_a_held_out_auc_of_0_70(tmp_path):
    """The documented two commands, smaller: ``python -m mpips.data clicks``, then
    examples/dlrm.py over it (2 servers, 2 workers, one pass)."""
    data = tmp_path / "clicks.h5"
    made = subprocess.run([sys.executable, "-m", "mpips.data", "clicks", "-o", str(data), "--samples", "200000",
                           "--keys", "2000000"], capture_output=True, text=True, timeout=120, check=True)
    bayes = float(re.search(r"Bayes held-out AUC ([0-9.]+)", made.stdout).group(1))
    out = run_mpi(4, [str(REPO / "examples" / "dlrm.py"), str(data)], timeout=240, cwd=tmp_path, check=True)
    held_out = float(re.search(r"held-out AUC ([0-9.]+) \(Bayes ([0-9.]+)\)", out.stdout).group(1))
    assert 0.70 <= held_out <= bayes + 0.01, out.stdout


def test_auc_is_the_probability_a_click_outranks_a_non_click():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5  # a tie counts half


def test_rows_travel_as_bf16_pulls_and_fp16_pushes_with_the_codec_flags(tmp_path):
    """``--pull-codec bf16 --compress fp16`` apply to the table's rows as to dense tensors: the
    run stays near one torch process (rounding only), and differs from it (the codecs acted)."""
    run_mpi(4, [str(CASES), "equal_adagrad", str(tmp_path / "out.pt"),
                json.dumps({"pull_codec": "bf16", "compress": "fp16"})], timeout=120, cwd=tmp_path, check=True)
    r = torch.load(tmp_path / "out.pt")
    rel = ((r["table"] - r["ref_table"]).abs().max() / r["ref_table"].abs().max()).item()
    assert 1e-5 < rel <= 2e-2, rel
