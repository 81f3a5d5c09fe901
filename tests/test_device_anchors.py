"""bench/device_anchors.sh, the script a GPU session runs its parts with: a part that trains refuses to
start while a background part (registered by `background` in $TMPDIR/device_anchors_background)
has not written its `done` (two training runs overflow one 80 GB card: session 9 lost a run to it);
`repro` stops DVC and every stage process at its deadline and runs `dvc repro` of each profile end to
end in a copy of the tree that a later call's tree cannot land on (here on the CPU, at micro sizes)."""

import json
import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def device_anchors(tmp_path, *args, cwd=ROOT, timeout=60, **env):
    """`bash bench/device_anchors.sh ARGS` in `cwd` with TMPDIR=tmp_path and the variables `env`."""
    env = {**os.environ, "TMPDIR": str(tmp_path), **env}
    env.pop("DEVICE_ANCHORS_SELF", None)
    return subprocess.run(["bash", "bench/device_anchors.sh", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def fake_site(site: Path, mains: dict[str, str]) -> None:
    """Packages named by `mains` in `site` (where the part would install the carried wheels), each
    with its `__main__.py` text; their presence skips the install."""
    for pkg, main in mains.items():
        (site / pkg).mkdir(parents=True)
        (site / pkg / "__init__.py").write_text("")
        (site / pkg / "__main__.py").write_text(main)


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


def test_repro_stops_dvc_and_its_stages_processes_at_the_deadline(tmp_path):
    """`repro` runs `python3 -m dvc repro` in a process group of its own and stops the whole group at
    its deadline (session 10 lost a call: `timeout` stopped dvc, a stage's process held the log
    open and the call ran out), then packs one .tgz per profile, the next profile after the last
    one stopped. Fakes: dvc starts a stage process that would outlive it; pgolf only answers; the
    shards exist."""
    import shutil
    import tarfile
    import time

    repo, site = tmp_path / "repo", tmp_path / "site"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "device_anchors.sh", repo / "bench")
    (repo / ".devrun" / "shards").mkdir(parents=True)
    (repo / ".devrun" / "shards" / "proxy_shards.json").write_text("{}")
    (repo / "params.yaml").write_text("x: 1\n")
    fake_site(site, {"zstandard": "", "pgolf": "import sys; print('pgolf', *sys.argv[1:])\n",
                     "dvc": "import subprocess, sys, time\nprint(\"Running stage 'train':\", flush=True)\n"
                            "child = subprocess.Popen(['sleep', '300'], stdout=sys.stdout)\n"
                            f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\ntime.sleep(300)\n"})
    t0 = time.monotonic()
    p = device_anchors(tmp_path, "repro", str(tmp_path / "out"), "record,pr535", "train.max_wallclock_seconds=60",
                       cwd=repo, DEVICE_ANCHORS_DEADLINE="3")
    assert p.returncode == 1 and time.monotonic() - t0 < 40, p.stdout + p.stderr  # neither ended by itself
    assert p.stdout.count("stopped at the deadline, 3 s") == 2 and "Running stage 'train':" in p.stdout
    status = Path(f"/proc/{(tmp_path / 'child.pid').read_text()}/status")  # the stage's process: gone
    assert not status.exists() or "\nState:\tZ" in status.read_text()  # (or a zombie, where nothing reaps)
    for profile in ("record", "pr535"):
        profile_log = f"pgolf profiles {profile} --set prepare.corpus=.devrun/shards prepare.val_source=.devrun/shards"
        with tarfile.open(tmp_path / "out" / f"repro_{profile}.tgz") as tar:
            names = {f"repro_{profile}/{f}" for f in ("repro.log", "profile.log", "summary.txt", "params.yaml")}
            assert names <= set(tar.getnames())
            assert profile_log in tar.extractfile(f"repro_{profile}/profile.log").read().decode()
        work = tmp_path / "work" / f"repro_{profile}"
        assert (work / ".git").is_dir()  # it ran in its copy, which holds the shards
        assert (work / ".devrun" / "shards" / "proxy_shards.json").exists()
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["repro_pr535.tgz", "repro_record.tgz"]
    assert not (repo / ".git").exists()
    # in the background (a run longer than one call), collected by a later call
    bg = tmp_path / "bg" / "repro"
    for args in (["background", str(bg), "repro", "record"], ["collect", str(tmp_path / "got"), str(bg), "40"]):
        p = device_anchors(tmp_path, *args, cwd=repo, DEVICE_ANCHORS_DEADLINE="2")
        assert p.returncode == 0, p.stdout + p.stderr
    assert f"collect: {bg} ended, exit 1" in p.stdout  # stopped at its deadline
    with tarfile.open(tmp_path / "got" / "repro.tgz") as tar:
        assert {"repro/repro_record.tgz", "repro/run.log", "repro/done"} <= set(tar.getnames())


def test_repro_runs_dvc_repro_of_pr2135_end_to_end_on_the_cpu(tmp_path):
    """The part a GPU session runs, with real DVC and real stages, in a copy of this checkout that
    is no git repository (it makes one): CaseOps shards from the embedded corpus (bench.proxy_shards,
    as on the device), `pgolf profiles pr2135 --set` with the micro sizes of SHRINK, `dvc repro`
    of every stage, the metrics and summary packed in repro.tgz. Where the wheels would be
    installed, links to this interpreter's DVC and zstandard stand in."""
    import sys
    import tarfile

    import dvc
    import zstandard
    from _dvc_repo import SHRINK, copy_checkout

    repo, site = tmp_path / "repo", tmp_path / "site"
    repo.mkdir()
    copy_checkout(repo)
    for src, dst in ((ROOT / "data" / "corpus" / "train" / "proxy-000-first711.jsonl.zst", ".devrun/proxy/docs.jsonl.zst"),
                     (ROOT / "data" / "corpus" / "val" / "fineweb_val_first901.jsonl.zst", ".devrun/val901/docs.jsonl.zst")):
        (repo / dst).parent.mkdir(parents=True, exist_ok=True)
        (repo / dst).write_bytes(src.read_bytes())
    site.mkdir()
    for mod in (dvc, zstandard):
        (site / mod.__name__).symlink_to(Path(mod.__file__).parent)
    sets = [f"{s}.{k}={v}" for s, kv in SHRINK.items() if s != "prepare" for k, v in kv.items()]
    before = (repo / "params.yaml").read_bytes()
    p = device_anchors(tmp_path, "repro", str(tmp_path / "out"), "pr2135", *sets, cwd=repo, timeout=600,
                       PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    assert p.returncode == 0 and "dvc repro pr2135: exit 0" in p.stdout, (p.stdout + p.stderr)[-3000:]
    assert (repo / "params.yaml").read_bytes() == before and not (repo / ".git").exists()  # it ran in its copy
    assert "Running stage 'evaluate':" in p.stdout and "original bytes, byte sidecar" in p.stdout
    with tarfile.open(tmp_path / "out" / "repro_pr2135.tgz") as tar:
        ev = json.loads(tar.extractfile("repro_pr2135/metrics/eval.json").read())
        params = yaml.safe_load(tar.extractfile("repro_pr2135/params.yaml").read())
    assert ev["stride"] == 0 and "phased" in json.dumps(ev)
    assert params["prepare"]["val_source"] == params["prepare"]["corpus"] == ".devrun/shards_caseops"
    assert params["train"]["nproc_per_node"] == 1 and params["model"]["model_dim"] == 32


def test_ablate_runs_bench_ablate_in_a_copy_that_holds_its_shards(tmp_path):
    """`ablate OUT DATA ROWS ARGS` runs bench.ablate (here a fake that records what it saw) in a copy
    of the tree under $TMPDIR/work/ablate holding the named shard folders and not the rest of .devrun,
    its JSON and logs written to OUT (what `collect` packs), its options passed on."""
    repo, site = tmp_path / "repo", tmp_path / "site"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "device_anchors.sh").write_bytes((ROOT / "bench" / "device_anchors.sh").read_bytes())
    (repo / "bench" / "ablate.py").write_text(
        "import json, os, sys\nargs = sys.argv[1:]\n"
        "open(args[args.index('--out') + 1], 'w').write(json.dumps({'cwd': os.getcwd(), 'argv': args,"
        " 'devrun': sorted(os.listdir('.devrun')), 'git': os.path.isdir('.git')}))\n")
    for folder in ("shards_901", "shards_caseops", "proxy"):
        (repo / ".devrun" / folder).mkdir(parents=True)
        (repo / ".devrun" / folder / "proxy_shards.json").write_text("{}")
    fake_site(site, {"zstandard": "", "dvc": ""})
    out = tmp_path / "out"
    p = device_anchors(tmp_path, "ablate", str(out), "docs901,pr2135", "bench/rows.yaml", "--seeds", "1337,42",
                       cwd=repo)
    assert p.returncode == 0, p.stdout + p.stderr
    seen = json.loads((out / "ablate.json").read_text())
    assert seen["cwd"] == str(tmp_path / "work" / "ablate") and seen["git"]
    assert seen["devrun"] == ["shards_901", "shards_caseops"]  # the proxy text stays behind
    assert seen["argv"] == ["--rows", "bench/rows.yaml", "--out", str(out / "ablate.json"), "--log-dir",
                            str(out / "logs"), "--seeds", "1337,42"]


def test_collect_returns_big_files_as_pieces_beside_the_tar(tmp_path):
    """`collect` packs DIR as one tar but DIR/big, whose files come back as 15 MiB pieces (a returned file
    holds at most 16 MiB) and their sha256; the pieces joined are the file."""
    bg = tmp_path / "bg" / "post"
    (bg / "big").mkdir(parents=True)
    (bg / "ablate.json").write_text("{}")
    (bg / "done").write_text("0\n")
    data = os.urandom(1 << 20) * 33  # 33 MiB: three pieces
    (bg / "big" / "pr2135_seed1337.quant.pgt").write_bytes(data)
    out = tmp_path / "out"
    p = device_anchors(tmp_path, "collect", str(out), str(bg), "1")
    assert p.returncode == 0, p.stdout + p.stderr
    pieces = sorted(out.glob("pr2135_seed1337.quant.pgt.part*"))
    assert [q.name[-6:] for q in pieces] == ["part00", "part01", "part02"]
    assert all(q.stat().st_size <= 15 << 20 for q in pieces) and b"".join(q.read_bytes() for q in pieces) == data
    assert (out / "pr2135_seed1337.quant.pgt.sha256").read_text().strip() == __import__("hashlib").sha256(data).hexdigest()
    names = subprocess.run(["tar", "-tzf", str(out / "post.tgz")], capture_output=True, text=True).stdout.split()
    assert "post/ablate.json" in names and not any("big" in n for n in names)
    assert "pr2135_seed1337.quant.pgt (34603008 bytes) in 3 pieces" in p.stdout
