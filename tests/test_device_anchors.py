"""bench/device_anchors.sh refuses to start a part that trains on the GPU while a background part
(registered by `background` in $TMPDIR/device_anchors_background) has not written its `done`:
two training runs overflow one 80 GB card (session 9 lost a run to it). Nothing else runs then."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def device_anchors(tmp_path, *args):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("DEVICE_ANCHORS_SELF", None)
    return subprocess.run(["bash", "bench/device_anchors.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_a_training_part_waits_for_a_running_background_part(tmp_path):
    running = tmp_path / "bg" / "ref42"
    running.mkdir(parents=True)
    registry = tmp_path / "device_anchors_background"
    registry.write_text(f"{tmp_path / 'bg' / 'old'}\n{running}\n")
    (tmp_path / "bg" / "old").mkdir()
    (tmp_path / "bg" / "old" / "done").write_text("0\n")  # an ended one does not block
    for part in (["wallclock", str(tmp_path / "out"), "pr2135", "pgolf", "42"],
                 ["repro", str(tmp_path / "out"), "pr2135", "train.max_wallclock_seconds=60"],
                 ["background", str(tmp_path / "bg2"), "wallclock", "pr2135", "reference", "1337"]):
        p = device_anchors(tmp_path, *part)
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"a background part still runs in {running}" in p.stderr and "collect OUT" in p.stderr
    assert registry.read_text().count("\n") == 2 and not (tmp_path / "out" / "shards_caseops.log").exists()
