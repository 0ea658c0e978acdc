"""The documentation cannot rot: the generated references match the code and the results, and the
commands of the getting-started page run.

- every flag of ``python -m mpips.train --help`` is in the flag reference generated from the config
  dataclasses (``docs/gen_flags.py``), and the reference names no flag that ``--help`` lacks;
- every figure of the performance tables (``docs/gen_perf.py``) equals the JSON under
  ``bench/results/`` it came from, to the digits printed;
- every command block of ``docs/getting-started.md`` runs, on the CPU, from a scratch directory
  (slow). Two lines are left out, and only those: ``bash jobs/setup.sh`` (CI has just run it; run
  inside the test it would reinstall the environment the test runs in) and ``bash jobs/test.sh``
  (the suite this test is part of). Pages other than getting started show cluster commands
  (sbatch, srun, module load) as text blocks, which are not run: no Slurm cluster here
  (``tests/test_slurm.py`` runs the job scripts on a private one);
- the own-loop page's port adds or changes at most 10 lines, its plain script runs, and (once
  ``mpips.job`` exists) the port trains to the plain script's parameters.

The Sphinx build itself (warnings as errors) is a stage of ``jobs/test.sh``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))

import gen_flags  # noqa: E402
import gen_perf  # noqa: E402

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _env() -> dict[str, str]:
    """This interpreter's venv first on PATH (also for jobs/env.sh), this checkout's mpips."""
    env = dict(os.environ)
    env["VENV"] = sys.prefix
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "1000"  # argparse's --help unwrapped: no flag cut at a line end
    return env


# --- the flag reference -----------------------------------------------------------------------

def test_every_help_flag_is_in_the_generated_flag_reference():
    out = subprocess.run([sys.executable, "-m", "mpips.train", "--help"], capture_output=True, text=True,
                         env=_env(), timeout=120, check=True).stdout
    help_flags = set(FLAG.findall(out)) - {"--help"}
    reference = gen_flags.render()
    listed = set(re.findall(r"`(--[a-z][a-z0-9-]*)", reference))
    assert len(help_flags) > 50, out[:500]
    assert sorted(help_flags - listed) == [], "flags of --help missing from the flag reference"
    assert sorted(listed - help_flags) == [], "flags in the reference that --help does not know"


def test_flag_reference_says_each_default_and_help_text():
    from mpips.config import Config

    reference = gen_flags.render()
    assert "| `--lr` | `0.003` | peak learning rate |" in reference
    assert "| `--staleness-lr` / `--no-staleness-lr` | `True` |" in reference
    assert f"| `--servers` | `{Config().roles.servers}` |" in reference


# --- the performance page ---------------------------------------------------------------------

def _numbers(cell: str) -> list[tuple[float, int]]:
    """The figure of one table cell as printed, (value, decimals), if the cell is a figure (not a
    label such as fp32 or mpips-bsp)."""
    m = re.fullmatch(r"-?\d[\d,]*(?:\.(\d+))?", cell)
    return [(float(cell.replace(",", "")), len(m.group(1) or ""))] if m else []


def _matches(printed: float, decimals: int, values: list[float]) -> bool:
    """Whether a printed figure is one of the record's values, rounded as printed, at one of the
    scales the page uses (as is, millions, thousandths of a second, points of a fraction)."""
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(printed - v * scale) <= tolerance * (1 + 1e-12)
               for v in values for scale in (1, 1e-6, 1e3, 100))


def _record_values(record: dict) -> list[float]:
    return [float(v) for v in record.values() if isinstance(v, int | float) and not isinstance(v, bool)]


def _tables(markdown: str) -> list[tuple[str, str, list[list[str]]]]:
    """[(file name, kind, body rows as cells)] of every captioned table of the generated page."""
    out = []
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"\(`([^`]+\.json)`: `(\w+)`\)$", line)
        if not m:
            continue
        rows, j = [], i + 4  # caption, blank, header, rule
        while j < len(lines) and lines[j].startswith("|"):
            rows.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
            j += 1
        out.append((m.group(1), m.group(2), rows))
    return out


def test_performance_tables_equal_the_json_they_came_from():
    files = {p.name: json.loads(p.read_text()) for p in (ROOT / "bench" / "results").glob("*/*.json")}
    assert files, "no benchmark results committed under bench/results/"
    tables = _tables(gen_perf.render())
    assert {name for name, _, _ in tables} == set(files), "every result file has its tables"
    checked = 0
    for name, kind, rows in tables:
        records = files[name][kind] if isinstance(files[name][kind], list) else [files[name][kind]]
        assert len(rows) == len(records), f"{name} {kind}: {len(rows)} rows for {len(records)} records"
        for cells, record in zip(rows, records, strict=True):
            values = _record_values(record)
            for cell in cells:
                for printed, decimals in _numbers(cell):
                    assert _matches(printed, decimals, values), (
                        f"{name} {kind}: {printed} in {cells} is none of the record's figures {record}")
                    checked += 1
    assert checked > 200, checked


def test_every_result_file_says_where_it_came_from():
    for path in (ROOT / "bench" / "results").glob("*/*.json"):
        result = json.loads(path.read_text())
        source, machine = result.get("source", {}), result.get("machine", {})
        for key in ("command", "date", "commit", "written_by"):
            assert source.get(key), f"{path}: source.{key} missing"
        assert machine.get("cores") and machine.get("cpu") and machine.get("mpi_library"), path


def test_a_changed_figure_changes_the_page(tmp_path):
    """The page is generated: edit the JSON and the table follows (no figure is typed by hand)."""
    src = next((ROOT / "bench" / "results").glob("*/bench-all-*.json"))
    (tmp_path / "m").mkdir()
    result = json.loads(src.read_text())
    result["rma"][0]["mpips_gbps"] = 123456.0
    (tmp_path / "m" / src.name).write_text(json.dumps(result))
    assert "123,456" in gen_perf.render(tmp_path)
    assert "123,456" not in gen_perf.render()


def test_readme_is_short_and_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "bash jobs/setup.sh && bash jobs/run.sh" in readme
    assert "bash jobs/setup.sh && bash jobs/test.sh" in readme
    assert "bash jobs/test.sh" in (ROOT / ".ci" / "run").read_text()


# --- the getting-started page -----------------------------------------------------------------

SETUP = "bash jobs/setup.sh"


def _shell_blocks(page: Path) -> list[str]:
    """The command lines of every ```shell block of a page, minus the two this test leaves out."""
    blocks = []
    for body in re.findall(r"^```shell\n(.*?)^```", page.read_text(), flags=re.S | re.M):
        lines = []
        for line in body.splitlines():
            command = line.strip()
            if command.startswith(SETUP + " && "):
                command = command[len(SETUP) + 4:]
            if not command or command.startswith("bash jobs/test.sh"):
                continue
            lines.append(command)
        if lines:
            blocks.append("\n".join(lines))
    return blocks


GETTING_STARTED = _shell_blocks(DOCS / "getting-started.md")


def test_getting_started_has_its_command_blocks():
    assert len(GETTING_STARTED) >= 5
    assert any(line.startswith("bash jobs/run.sh ") for block in GETTING_STARTED for line in block.splitlines())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", GETTING_STARTED, ids=[b.splitlines()[0][:40] for b in GETTING_STARTED])
def test_getting_started_block_runs(block, tmp_path):
    for name in ("jobs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    script = f"set -euo pipefail\nsource jobs/env.sh\n{block}\n"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=580)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    assert "mpips: bad" not in out and "FATAL" not in out, out[-4000:]
    if "--checkpoint-dir runs/ckpt" in block:
        assert sorted(p.name for p in (tmp_path / "runs" / "ckpt").glob("ckpt-*.h5"))[-1] == "ckpt-00000080.h5"
    if "mpips.report" in block:
        assert (tmp_path / "runs" / "first" / "report" / "summary.txt").exists()


# --- the own-loop page ------------------------------------------------------------------------

def _changed_lines(before: Path, after: Path) -> tuple[int, int]:
    a, b = before.read_text().splitlines(), after.read_text().splitlines()
    diff = [line for line in difflib.unified_diff(a, b, lineterm="", n=0) if line[:3] not in ("+++", "---")]
    added = sum(1 for line in diff if line.startswith("+") and line[1:].strip())
    removed = sum(1 for line in diff if line.startswith("-") and line[1:].strip())
    return added, removed


def test_the_ports_on_the_own_loop_page_change_at_most_10_lines():
    """The torch port (examples/port: run and compared by tests/test_own_loop.py) and the Horovod
    port (docs/snippets, run below)."""
    port = ROOT / "examples" / "port"
    for before, after in ((port / "plain_torch.py", port / "mpips_port.py"),
                          (DOCS / "snippets" / "horovod_loop.py", DOCS / "snippets" / "horovod_ported.py")):
        added, removed = _changed_lines(before, after)
        assert added <= 10 and removed <= 10, (after.name, added, removed)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_horovod_port_runs_under_mpirun(tmp_path):
    subprocess.run(["mpirun", "-n", "4", sys.executable, str(DOCS / "snippets" / "horovod_ported.py")], cwd=tmp_path,
                   env=_env(), check=True, timeout=280)
    assert (tmp_path / "model.pt").exists()
