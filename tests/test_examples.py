"""Each script of examples/ runs as a user runs it (mpirun -n 4: 1 server, 1 data server, 2
workers) with few steps, and reaches what its task promises: the regression the noise floor,
the CNN a held-out accuracy, the language model a perplexity far below a uniform guess's."""

import json
import re

import pytest
from helpers import REPO, run_mpi

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run_example(name: str, steps: int, tmp_path, *extra: str) -> str:
    out = run_mpi(4, [str(REPO / "examples" / name), "--steps", str(steps), "--dir", str(tmp_path / "data"),
                      *extra], timeout=300, cwd=tmp_path, check=True)
    assert "final metrics" in out.stdout and "Traceback" not in out.stderr, out.stderr[-2000:]
    return out.stdout


def test_regression_with_a_custom_loss_reaches_the_noise_floor(tmp_path):
    out = run_example("regression.py", 150, tmp_path, "--metrics", str(tmp_path / "m.jsonl"))
    mse, mae, r2 = map(float, re.search(r"held-out mse ([0-9.]+) mae ([0-9.]+) r2 ([0-9.]+)", out).groups())
    assert 0.008 < mse <= 0.0125, out  # the noise variance is 0.01: no model can do much better
    assert re.search(rf"^held-out mse\s+{mse:.4f}$", out, re.M)  # the final table says the same
    assert r2 > 0.99 and mae < 0.1
    events = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    end = next(e for e in events if e["event"] == "end")  # the metrics file too, by name
    assert end["mse"] == pytest.approx(mse, abs=1e-5) and end["r2"] == pytest.approx(r2, abs=1e-5)
    assert "accuracy" not in end


def test_cnn_on_the_users_image_files(tmp_path):
    out = run_example("cnn_images.py", 150, tmp_path)
    accuracy = float(re.search(r"cnn: held-out accuracy ([0-9.]+)", out).group(1))
    assert accuracy >= 0.9, out


def test_token_language_model_learns_the_chain(tmp_path):
    out = run_example("token_lm.py", 40, tmp_path)
    perplexity = float(re.search(r"held-out perplexity ([0-9.]+)", out).group(1))
    assert perplexity < 16, out  # uniform over 64 tokens: 64; the chain itself: 4
    assert re.search(r"^held-out perplexity\s+[0-9.]+$", out, re.M)
