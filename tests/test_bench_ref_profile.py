"""bench.ref_profile: the profiler window covers exactly the training steps asked for, counted from
the script's last optimizer restore (its warm-up steps before it do not count), and the process
ends when the window closes; a script that ends first says so and exits 1. CPU, a fake script."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE = '''
import torch
from torch.profiler import record_function

class Muon(torch.optim.SGD):
    pass

w = torch.nn.Parameter(torch.ones(4))
opt, other = Muon([w], lr=0.1), torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
saved = opt.state_dict()
for i in range(5):  # the warm-up, then the restore
    with record_function(f"warm{i}"):
        (w * w).sum().backward(); opt.step(); other.step()
opt.load_state_dict(saved)
for i in range(1, STEPS + 1):
    with record_function(f"train{i}"):
        (w * w).sum().backward(); other.step(); opt.step()
    print(f"step {i}", flush=True)
'''


def run(tmp_path, steps_in_script, at, steps):
    script = tmp_path / "train_gpt.py"
    script.write_text(FAKE.replace("STEPS", str(steps_in_script)))
    out, trace = tmp_path / "p.json", tmp_path / "t.json.gz"
    p = subprocess.run([sys.executable, "-m", "bench.ref_profile", str(script), "--at", str(at), "--steps", str(steps),
                        "--accum", "1", "--out", str(out), "--trace", str(trace)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    return p, out, trace


def test_the_window_is_the_training_steps_after_the_restore(tmp_path):
    p, out, trace = run(tmp_path, 10, at=3, steps=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "step 6" not in p.stdout  # the process ended with the window (after step 5)
    got = json.loads(out.read_text())
    assert got["profiled_steps"] == [4, 5] and got["optimizer"] == "Muon"
    names = {e["name"] for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]}
    assert {"train4", "train5"} <= names
    assert not names & {"train3", "train6", *(f"warm{i}" for i in range(5))}


def test_a_script_that_ends_before_the_window_closes_exits_1(tmp_path):
    p, out, _ = run(tmp_path, 4, at=3, steps=2)
    assert p.returncode == 1 and "ended before step 5 of its optimizer Muon" in p.stdout
    assert not out.exists()
