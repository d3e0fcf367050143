"""Runs that stop and continue: SIGTERM then --resume gives the uninterrupted run's weights bit for
bit, and a run recorded without MLflow (as on the GPU machine) is imported and continued."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys

import mlflow
import pytest
import torch
from PIL import Image
from train_runs import MAIN, REPO, env_for, final_weights, mlflow_run, run, smoke_args

from train.loop.state import latest_state


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run(tiles_dir, tmp_path):
    env = env_for(tmp_path)
    args = [sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "train.max_steps=12", "--set", "train.ckpt_every=100",
            "--set", "train.val_every=4",  # validation does not touch the weights
            "--set", "train.ema_decay=0.9"]  # nor the weight average, which resumes too
    ref = run(args + ["--out", str(tmp_path / "ref")], env)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(args + ["--out", str(tmp_path / "cut")], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "step 4/12" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stderr.readlines()
    # not a finished run: 128 + the signal, so `main.py && export ...` stops there
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "".join(lines)[-3000:]
    stopped = int(latest_state(tmp_path / "cut" / "checkpoints").stem.split("_")[1])
    assert 4 <= stopped < 12, "".join(lines)[-2000:]
    assert any("stopped by SIGTERM" in line for line in lines)
    # the stopped run (a time-boxed GPU chunk) already holds its best model and curves
    run_id = torch.load(tmp_path / "cut" / "image_compression_model.pth", weights_only=True)["mlflow_run_id"]
    r = mlflow_run(env, run_id)
    assert r.info.status == "KILLED" and r.data.tags["stopped_at_step"] == str(stopped)
    assert {"image_compression_model.pth", "curves.png"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}

    resumed = run(args + ["--out", str(tmp_path / "cut"), "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and f"at step {stopped}" in resumed.stderr
    assert f"step {stopped + 1}/12" in resumed.stderr and f"step {stopped}/12" not in resumed.stderr
    assert "val_psnr nan" not in "".join(lines) + resumed.stderr  # '-' before a first validation, then the last one
    for part in ("model", "ema"):
        ref_w, cut_w = final_weights(tmp_path / "ref", part), final_weights(tmp_path / "cut", part)
        assert ref_w.keys() == cut_w.keys()
        for k in ref_w:
            assert torch.equal(ref_w[k], cut_w[k]), (part, k)
    # one MLflow run, stopped then finished
    assert torch.load(tmp_path / "cut" / "image_compression_model.pth", weights_only=True)["mlflow_run_id"] == run_id
    r = mlflow_run(env, run_id)
    assert r.info.status == "FINISHED" and r.data.tags["stopped_by"] == "SIGTERM"


@pytest.mark.slow
def test_a_run_recorded_without_mlflow_is_imported_and_continued(tiles_dir, tmp_path, monkeypatch, capsys):
    """The GPU machine has no MLflow: the run is recorded to a file, imported here (where its model,
    once shipped, is registered to it), and a later call continues from its weights (train.init_from)."""
    from train.evaluate import main as evaluate
    from train.import_run import main as import_run
    from train.ship import main as ship

    tiles, env = tiles_dir, env_for(tmp_path)
    for key in ("JPEG_RESTORE_DATA_ROOT", "MLFLOW_TRACKING_URI"):  # the in-process commands below read them too
        monkeypatch.setenv(key, env[key])
    out = tmp_path / "gpu-run"
    without_mlflow = ("import runpy, sys; sys.modules['mlflow'] = None; "  # as not installed: its import fails, find_spec says None
                      f"sys.argv = {[MAIN, *smoke_args(tiles), '--out', str(out)]!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = run([sys.executable, "-c", without_mlflow], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"MLflow is not installed: recording this run to {out / 'mlflow_record.jsonl'}" in proc.stderr
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")  # nothing in the store yet
    few = tmp_path / "few"  # three test images are enough to see the figures travel
    few.mkdir()
    for tile in sorted(tiles.glob("*.png"))[:3]:
        shutil.copy(tile, few)
    eval_args = ["--checkpoint", str(out / "image_compression_model.pth"), "--dataset", str(few), "--qualities", "10", "--log-mlflow"]
    assert evaluate(eval_args) == 0  # evaluated on the GPU machine, before the import: added to the record
    assert f"to {out / 'mlflow_record.jsonl'}" in capsys.readouterr().out
    assert ship([str(out / "image_compression_model.pth"), "--out", str(tmp_path / "early.pth")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("not registered in MLflow: run offline-")
    assert import_run([str(out), "--tag", "gpu=none (test)"]) == 0
    (r,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert r.info.status == "FINISHED" and r.data.tags["gpu"] == "none (test)" and r.info.run_name == "dncnn-gpu-run"
    assert r.data.params["train.max_steps"] == "6" and "val_psnr" in r.data.metrics
    assert min(r.data.metrics[f"few_{kind}_psnr_q10"] for kind in ("model", "jpeg")) > 20  # the record's evaluation
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(r.info.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert {"config.toml", "image_compression_model.pth", "curves.png"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)}
    capsys.readouterr()
    assert ship([str(out / "image_compression_model.pth"), "--out", str(tmp_path / "shipped.pth")]) == 0  # to the imported run
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"registered in MLflow as shipped version 1 (alias shipped), from run {r.info.run_id}"
    assert import_run([str(out)]) == 2 and "already in the store" in capsys.readouterr().err
    assert evaluate(eval_args) == 0 and f"to MLflow run {r.info.run_id}" in capsys.readouterr().out
    best = out / "image_compression_model.pth"
    cont = run([sys.executable, MAIN, *smoke_args(tiles), "--set", f"train.init_from={best}", "--set", "tracking.enabled=false",
                "--out", str(tmp_path / "next-call")], env)
    assert cont.returncode == 0 and f"initialised the weights from {best}" in cont.stderr, cont.stderr[-2000:]
    wrong = run([sys.executable, MAIN, "--config", str(REPO / "configs" / "unet.toml"), "--smoke", "--set", f"data.dataset={tiles}",
                 "--set", f"train.init_from={best}", "--out", str(tmp_path / "wrong")], env)
    assert wrong.returncode == 2 and "holds a dncnn gray model" in wrong.stderr


@pytest.mark.slow
def test_a_record_its_process_was_killed_in_imports_as_killed(tiles_dir, tmp_path, monkeypatch, capsys):
    """`kill -9` (the OOM killer, a GPU call's time limit) leaves a record without its end, its last
    line maybe cut: imported as FINISHED, a run killed at step 74 of 100000 looked complete; one
    killed in a resumed session took the first session's end."""
    from train.import_run import main as import_run

    env = env_for(tmp_path)
    out = tmp_path / "gpu-run"
    args = [sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "tracking.offline=true", "--out", str(out)]
    for more in ([], ["--resume", "--set", "train.max_steps=9"]):  # two sessions, each ended
        proc = run(args + more, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "mlflow_record.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["status"] for line in lines if '"status"' in line] == ["FINISHED", "RUNNING", "FINISHED"]
    losses = [i for i, line in enumerate(lines) if '"train_loss"' in line]
    for name, cut, steps in (("first", losses[5], [1, 2, 3, 4, 5]), ("second", losses[8], list(range(1, 9)))):
        shutil.copytree(out, tmp_path / name)
        record = tmp_path / name / "mlflow_record.jsonl"
        record.write_text("".join(lines[:cut]) + lines[cut][:40])  # as a kill mid-write leaves it
        store = f"sqlite:///{tmp_path / name}.db"  # one store each: the copies are one run to MLflow
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)
        capsys.readouterr()
        assert import_run([str(tmp_path / name)]) == 0
        err = capsys.readouterr().err
        assert f"note: the last line of {record} is cut" in err and f"note: {record} has no end" in err, err
        (r,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
        history = [m.step for m in mlflow.MlflowClient().get_metric_history(r.info.run_id, "train_loss")]
        assert r.info.status == "KILLED" and history == steps, (name, r.info.status, history)


def test_a_run_resumed_with_more_steps_ends_its_cosine_at_the_new_count(tiles_dir, tmp_path):
    """torch's cosine is periodic: left at the saved length, a run extended from 6 to 12 steps would
    climb back to the peak rate after step 6. From a mid-run state (step 3) the rate now falls to
    min_lr at step 12; from the finished run it stays at min_lr, with a warning that says so."""
    env, out = env_for(tmp_path), tmp_path / "out"
    args = [sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "tracking.enabled=false", "--set", "train.ckpt_every=3",
            "--set", "schedule.warmup_steps=2"]  # then the cosine
    assert run(args + ["--out", str(out)], env).returncode == 0
    shutil.copytree(out, tmp_path / "finished")
    (out / "checkpoints" / "step_00000006.pt").unlink()

    def rates(folder):
        proc = run(args + ["--set", "train.max_steps=12", "--resume", "--out", str(folder)], env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr, [float(re.search(r" lr (\S+)", line)[1]) for line in proc.stderr.splitlines() if "/12 loss" in line]

    _, mid = rates(out)
    assert len(mid) == 9 and all(a > b for a, b in zip(mid, mid[1:])) and mid[-1] == pytest.approx(1e-6), mid
    log, finished = rates(tmp_path / "finished")
    assert finished == [pytest.approx(1e-6)] * 6 and "finished its cosine schedule at step 6" in log, (finished, log[-2000:])


def test_resume_refuses_optimizer_and_schedule_changes_the_saved_state_would_undo(tiles_dir, tmp_path):
    """The optimizer's and scheduler's state hold their settings: a changed rate would be put back
    silently, another warm-up failed with a KeyError. Refused in one line; grad_clip, read at every
    step, may change."""
    env, out = env_for(tmp_path), tmp_path / "out"
    args = [sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "tracking.enabled=false", "--set", "schedule.warmup_steps=2"]
    assert run(args + ["--out", str(out)], env).returncode == 0
    for change, said in ((["optim.lr=5e-4"], "optim.lr: 0.001 -> 0.0005"), (["schedule.warmup_steps=0"], "schedule.warmup_steps: 2 -> 0")):
        proc = run(args + ["--set", *change, "--resume", "--out", str(out)], env)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("error: ") and f"--resume cannot change {said}" in last, proc.stderr[-2000:]
        assert "train.init_from=" in last
    proc = run(args + ["--set", "optim.grad_clip=1.0", "--set", "train.max_steps=8", "--resume", "--out", str(out)], env)
    assert proc.returncode == 0 and "optim.grad_clip: 0.0 -> 1.0" in proc.stderr, proc.stderr[-2000:]


def test_resume_stops_when_the_held_out_images_changed(tiles_dir, tmp_path):
    """A run continued on a source folder whose images changed between sessions validated on other
    images than its best model had, and kept or replaced that model by numbers that do not compare.
    Other held-out images stop it in one line; other training images are said, and it goes on."""
    from data_pipeline.prepare import load_manifest, split_records

    source = tmp_path / "photos"
    shutil.copytree(tiles_dir, source)
    env, out = env_for(tmp_path), tmp_path / "out"
    args = [sys.executable, MAIN, *smoke_args(source), "--set", "tracking.enabled=false", "--out", str(out), "--resume"]
    assert run(args, env).returncode == 0
    manifest = load_manifest(out / "prepared" / "photos-gray")
    held_out, trained = (source / split_records(manifest, split, 4)[0]["source"] for split in ("val", "train"))
    kept = held_out.read_bytes()
    Image.open(held_out).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(held_out)
    proc = run([*args, "--set", "train.max_steps=9"], env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: the held-out images of {source} changed since the run's last state (other images): its best validation "
        f"PSNR, {torch.load(out / 'image_compression_model.pth', weights_only=True)['metrics']['val_psnr']:.3f} dB, would "
        f"not compare. Put the images back as they were, or continue from its weights in a new run: another --out with "
        f"--set train.init_from={out / 'image_compression_model.pth'}"), proc.stderr[-2000:]
    held_out.write_bytes(kept)
    Image.open(trained).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(trained)
    proc = run([*args, "--set", "train.max_steps=9"], env)
    assert proc.returncode == 0 and "step 9/9" in proc.stderr, proc.stderr[-2000:]
    assert f"the training images of {source} changed since the run's last state (4 -> 4 images): it goes on" in proc.stderr
