"""bench.wheel_closure (what bench/device_wheels.sh downloads for the lent GPU image): the installed
dependency closure of a distribution, markers evaluated for the image, skipped names pruned with
everything only they need, a needed package that is not installed named."""

from importlib import metadata

import pytest

from bench import wheel_closure as W


def test_the_closure_holds_installed_versions_and_leaves_out_skipped_names_and_their_needs():
    full = W.closure("dvc", set())
    assert {"dvc", "dvc-data", "dvc-task", "celery", "billiard"} <= set(full)
    assert all(v == metadata.version(n) for n, v in full.items())
    pruned = W.closure("dvc", {"Celery"})  # names normalized; billiard is only celery's
    assert "celery" not in pruned and "billiard" not in pruned and "dvc-data" in pruned


def test_markers_are_evaluated_for_the_image_not_for_this_machine():
    assert "pywin32" not in W.closure("dvc-task", set())  # pywin32 ; sys_platform == "win32"
    with pytest.raises(SystemExit, match="pywin32 is needed but not installed"):
        W.closure("dvc-task", set(), {**W.IMAGE, "sys_platform": "win32"})
    assert "funcy" not in W.closure("dvc-data", set())  # funcy ; python_version < "3.12"
    assert "funcy" in W.closure("dvc-data", set(), {**W.IMAGE, "python_version": "3.11"})


def test_main_prints_name_equals_version_lines(capsys):
    assert W.main(["dvc-task", "--skip", "celery"]) == 0
    lines = capsys.readouterr().out.split()
    assert f"dvc-task=={metadata.version('dvc-task')}" in lines and not any(l.startswith("celery==") for l in lines)
