import re
import tomllib
from pathlib import Path

import pytest

from runtime.models import build_model
from train.loop.config import ConfigError, load_config
from train.loop.trainer import SMOKE_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
TOMLS = sorted((REPO / "configs").glob("*.toml"))
SWEEPS = [p for p in TOMLS if "configs" in tomllib.loads(p.read_text())]  # sweep files list the configs they run
CONFIGS = [p for p in TOMLS if p not in SWEEPS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_builds_its_model(path):
    cfg = load_config(path)
    assert path.stem.startswith(cfg.model.arch)  # unet.toml, unet_color.toml, ...
    build_model(cfg.model.arch, channels=cfg.data.channels, **cfg.model.kwargs)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_file_expands_into_loadable_tasks(path):
    from train.sweep import load_sweep, tasks

    assert len(tasks(load_sweep(path))) >= 2  # each task's config is loaded and checked on the way


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS[0], ["optim.lr=2e-4", "data.qualities=[10]", "train.precision=fp32", "optim.lr=3"])
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.qualities == [10] and cfg.train.precision == "fp32"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key optim.lrr (known in optim: name, lr"),
    ("nope.x=1", "unknown config key nope"),
    ("optim.lr=fast", "optim.lr must be of type float, got 'fast'"),
    ("train.max_steps=1.5", "train.max_steps must be of type int"),
    ("data.backend=tf", "data.backend must be one of"),
    ("data.qualities=[0]", "data.qualities must be JPEG qualities"),
    ("data.qualities=[10, 10]", "data.qualities must name each quality once, got [10, 10]"),
    ("model.arch=vgg", "model.arch must be one of arcnn, attention"),
    ("train.loss=huber", "train.loss must be one of l1, mse, charbonnier, got 'huber'"),
    ("optim.name=lion", "optim.name must be one of adam, adamw, sgd, got 'lion'"),
    ("schedule.name=linear", "schedule.name must be one of cosine, step, plateau, constant, got 'linear'"),
    ("train.precision=fp8", "train.precision must be one of auto, bf16, fp16, fp32, got 'fp8'"),
    ("train.val_every=0", "train.val_every must be positive, got 0"),
    ("train.ckpt_every=0", "train.ckpt_every must be positive, got 0"),
    ("train.max_steps=0", "train.max_steps must be positive, got 0"),
    ("optim.lr=-1", "optim.lr must be positive, got -1"),
    ("data.workers=-1", "data.workers must be 0 or more"),
    ('model.kwargs.width="wide"', "model.kwargs.width must be of type int like its default 64, got 'wide'"),
    ("model.kwargs.channels=3", "model.kwargs.channels is not an argument of dncnn"),
    ("data.quality_plane=true", "data.quality_plane = true needs model.kwargs.cond_channels = 1"),
    ("model.kwargs.cond_channels=1", "data.quality_plane = false needs model.kwargs.cond_channels = 0"),
    ("model.kwargs={depthh=3}", "model.kwargs.depthh is not an argument of dncnn"),
    ("model.kwargs.width=-3", "model.kwargs.width must be 0 or more, got -3"),
    ("model.kwargs.width=0", "model.kwargs: dncnn(width=0) cannot be built: layer body.0.weight would be empty"),
    ("optim.lr", "must look like section.key=value"),
    ("=3", "override '=3' must look like section.key=value"),  # was "unknown config key  (known ...)"
    ("optim..lr=3", "override 'optim..lr=3' must look like section.key=value"),
    # nan passed every range check (x < 0 is false): a traceback from torch or a run that ignored it
    ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
    ("optim.grad_clip=nan", "optim.grad_clip must be a finite number, got nan"),
    ("schedule.min_lr=nan", "schedule.min_lr must be a finite number, got nan"),
    ("train.time_budget_s=inf", "train.time_budget_s must be a finite number, got inf"),
    ("data.qualities=[10, nan]", "data.qualities[1] must be a finite number, got nan"),
    ("model={arch='unet', kwargs={dropout=nan}}", "model.kwargs.dropout must be a finite number, got nan"),
    ("model={arch='dncnn', kwargs={depth=99999999999}}", "model.kwargs.depth must be at most 10000, got 99999999999"),
    ("model={arch='unet', kwargs={levels=99999999999}}", "model.kwargs.levels must be at most 10000, got 99999999999"),
    # tracebacks from torch, numpy and threading once the run started
    ("data.seed=-1", "data.seed must be in 0..2147483647, got -1"),
    ("train.seed=99999999999999999999", "train.seed must be in 0..2147483647, got 99999999999999999999"),
    ("tracking.timeout_s=1e300", "tracking.timeout_s must be at most 9223372036, got 1e+300"),
    ("train.ddp_timeout_s=99999999999999999999", "train.ddp_timeout_s must be at most 9223372036, got 1e+20"),
])
def test_bad_keys_and_values_are_rejected_with_the_name(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "x.toml")
    (tmp_path / "bad.toml").write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    # what a user passes by mistake, each a one-line error: a folder, a checkpoint, a Latin-1 comment
    (tmp_path / "latin1.toml").write_bytes("# r\u00e9sum\u00e9\n[data]\n".encode("latin-1"))
    (tmp_path / "model.pth").write_bytes(b"PK\x03\x04\x14\x00\x80\x00")  # a checkpoint is a zip
    for path, message in ((tmp_path, "is a folder, not a TOML file"),
                          (tmp_path / "model.pth", "is not valid TOML (not UTF-8 text: byte 6 is 0x80)"),
                          (tmp_path / "latin1.toml", "is not valid TOML (not UTF-8 text: byte 3 is 0xe9)")):
        with pytest.raises(ConfigError, match=re.escape(f"config file {path} {message}")):
            load_config(path)


def test_a_config_saved_with_a_byte_order_mark_loads(tmp_path):
    """Windows editors may start a UTF-8 file with a BOM, which TOML parsers call an invalid statement."""
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + (REPO / "configs" / "unet.toml").read_bytes())
    assert load_config(tmp_path / "bom.toml") == load_config(REPO / "configs" / "unet.toml")


def test_sweep_file_lists_every_architecture_config_and_expands_the_grid(tmp_path):
    from runtime.models import architectures
    from train.sweep import load_sweep, task_args, tasks

    sweep = load_sweep()
    assert sorted(sweep["configs"]) == architectures()
    assert set(sweep["configs"]) <= {p.stem for p in CONFIGS}
    grid = tmp_path / "grid.toml"
    grid.write_text('configs = ["dncnn", "unet"]\n[grid]\n"optim.lr" = [1e-3, 3e-4]\n"train.loss" = ["l1", "mse"]\n')
    all_tasks = tasks(load_sweep(grid))
    assert len(all_tasks) == 8 and all_tasks[1]["name"] == "dncnn[optim.lr=0.001,train.loss=mse]"
    args = task_args(load_sweep(grid), 7, "42")
    cfg = load_config(args[1], [a for a in args[2:] if a != "--set"])
    assert cfg.model.arch == "unet" and cfg.optim.lr == 3e-4 and cfg.train.loss == "mse"
    assert cfg.tracking.tags == {"sweep_id": "42", "array_index": "7", "grid_point": "optim.lr=0.0003,train.loss=mse"}
    bad = tmp_path / "bad.toml"
    bad.write_text('configs = ["dncnn"]\n[grid]\n"optim.nope" = [1]\n')
    with pytest.raises(ConfigError, match="unknown config key optim.nope"):
        tasks(load_sweep(bad))
    with pytest.raises(ConfigError, match="outside the sweep"):
        task_args(load_sweep(grid), 8, "42")


def test_a_sweep_file_given_as_a_config_and_a_config_given_as_a_sweep_file_say_which_command_runs_them():
    from train.sweep import load_sweep

    sweep, config = REPO / "configs" / "sweep.toml", REPO / "configs" / "unet.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{sweep} is a sweep file, not a training config: its tasks run with SWEEP_FILE={sweep}")):
        load_config(sweep)
    with pytest.raises(ConfigError, match=re.escape(f"{config} is a training config, not a sweep file: python train/main.py --config {config}")):
        load_sweep(config)


def test_sweep_variants_change_one_setting_of_the_base_each(tmp_path):
    from train.sweep import load_sweep, task_args, tasks

    ablations = tasks(load_sweep(Path(__file__).resolve().parents[1] / "configs" / "ablations.toml"))
    assert ablations[0]["name"] == "unet[base]" and len({t["name"] for t in ablations}) == len(ablations)
    sweep = tmp_path / "variants.toml"
    sweep.write_text('configs = ["unet"]\n[base]\n"model.kwargs" = { width = 8, levels = 2 }\n"train.max_steps" = 7\n'
                     '[variants]\nbase = {}\nflat = { "model.kwargs" = { width = 8, levels = 2, skips = false } }\n'
                     'mse = { "train.loss" = "mse" }\n[grid]\n"optim.lr" = [1e-3, 3e-4]\n')
    assert [t["name"] for t in tasks(load_sweep(sweep))][2:4] == ["unet[flat,optim.lr=0.001]", "unet[flat,optim.lr=0.0003]"]
    args = task_args(load_sweep(sweep), 3, "9")
    cfg = load_config(args[1], [a for a in args[2:] if a != "--set"])
    assert cfg.model.kwargs == {"width": 8, "levels": 2, "skips": False} and cfg.train.max_steps == 7
    assert cfg.optim.lr == 3e-4 and cfg.train.loss == "l1" and cfg.tracking.tags["grid_point"] == "flat,optim.lr=0.0003"
    sweep.write_text('configs = ["dncnn", "unet"]\n[base]\n"optim.lr" = 1e-3\n[overrides.dncnn]\n"optim.lr" = 1e-4\n'
                     '[variants]\nmse = { "train.loss" = "mse" }\n')
    for i, lr in ((0, 1e-4), (1, 1e-3)):  # a config's own settings go over the base, under the variants
        args = task_args(load_sweep(sweep), i, "9")
        cfg = load_config(args[1], [a for a in args[2:] if a != "--set"])
        assert cfg.optim.lr == lr and cfg.train.loss == "mse"
    sweep.write_text('configs = ["unet"]\n[overrides.dncnn]\n"optim.lr" = 1e-4\n')
    with pytest.raises(ConfigError, match="overrides for dncnn, which is not one of its configs"):
        load_sweep(sweep)
    sweep.write_text('configs = ["unet"]\n[variants]\nbad = { "model.kwargs" = { widht = 8 } }\n')
    with pytest.raises(ConfigError, match="model.kwargs.widht is not an argument of unet"):
        tasks(load_sweep(sweep))


@pytest.mark.parametrize("text, message", [
    ('configs = "dncnn"', "configs must be a list of config names, got 'dncnn'"),
    ('configs = ["dncnn"]\n[grid]\n"optim.lr" = 1e-3', "grid.optim.lr must be a non-empty list of values, got 0.001"),
    ('configs = ["dncnn"]\n[grid]\n"optim.lr" = []', "grid.optim.lr must be a non-empty list of values, got []"),
    ('configs = ["dncnn"]\ngrid = 3', "grid must be a table, got 3"),
    ('configs = ["dncnn"]\nvariants = { a = 1 }', "variants.a must be a table of settings, got 1"),
    ('experiment = 5\nconfigs = ["dncnn"]', "experiment must be a string, got 5"),
])
def test_a_misshapen_sweep_file_is_one_line(tmp_path, text, message):
    from train.sweep import load_sweep

    path = tmp_path / "sweep.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert str(err.value) == f"sweep file {path}: {message}"


def test_film_without_the_quality_plane_is_rejected_in_one_line():
    with pytest.raises(ConfigError, match="film = true modulates by the quality: it needs data.quality_plane = true"):
        load_config(None, ["model.arch=unet", "model.kwargs={film=true}"])
    cfg = load_config(None, ["model.arch=unet", "model.kwargs={cond_channels=1, film=true}", "data.quality_plane=true"])
    assert cfg.model.kwargs["film"] is True


def test_a_blocking_loss_on_patches_without_a_block_boundary_is_rejected_in_one_line():
    """At data.patch_size 8 the loss's blocking term divided by no boundaries: the first step's loss
    was nan and the run stopped as diverged."""
    with pytest.raises(ConfigError, match=re.escape("it needs data.patch_size of at least 9 (a boundary each way), got 8")):
        load_config(None, ["train.blocking_weight=0.3", "data.patch_size=8"])
    assert load_config(None, ["train.blocking_weight=0.3", "data.patch_size=9"]).data.patch_size == 9


def test_print_config_shows_the_resolved_config_and_trains_nothing(tmp_path):
    """--print-config: the config file, --smoke and --set resolved, as TOML that --config loads again."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    unet = repo / "configs" / "unet.toml"
    args = [sys.executable, str(repo / "train" / "main.py"), "--config", str(unet), "--smoke", "--set", "optim.lr=3e-4",
            "--out", str(tmp_path / "out"), "--print-config"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    (tmp_path / "resolved.toml").write_text(proc.stdout)
    printed = load_config(tmp_path / "resolved.toml")
    assert printed == load_config(unet, [*SMOKE_OVERRIDES, "optim.lr=3e-4"]) and printed.optim.lr == 3e-4
    assert not (tmp_path / "out").exists()
    proc = subprocess.run([*args[:-1], "--set", "optim.lr=-1", "--print-config"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith("error: optim.lr"), proc.stderr
