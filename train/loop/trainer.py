"""The Trainer: one readable loop around a model, a loader, an optimizer and MLflow.

    trainer = Trainer(cfg, out_dir, info, resume=True)
    try:
        trainer.fit()
    finally:
        trainer.close()
"""
from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from data_pipeline.errors import ReportedElsewhere, UserError, out_of_memory
from data_pipeline.images import atomic_write_bytes, check_output_folder
from data_pipeline.loaders import build_loader
from runtime import checkpoint as ckpt
from runtime.device import autocast_for, emulated_precision_warning, free_memory, resolve_precision
from runtime.figures import side_by_side
from runtime.models import build_model, macs_per_pixel, meta_model
from runtime.tiling import TILE

from .budget import TimeBudget, set_total_steps
from .config import Config, ConfigError, read_toml, to_dict, to_toml
from .data import check_same_data, prepared_data, take_prepared_settings
from .distributed import DistInfo, all_reduce_sum, any_rank, gather_objects, lost_other_ranks, max_over_ranks, on_every_rank, on_main_rank
from .ema import WeightEMA
from .optim import build_loss, build_optimizer, build_scheduler, state_bytes_per_parameter
from .profiling import StepProfiler
from .progress import Progress
from .state import OutputLock, latest_state, load_latest, prune_states, remove_partial_writes, state_path
from .tracking import flatten, make_tracker, system_tags
from .validation import Validator

log = logging.getLogger(__name__)
# Under DDP the check for a stop signal is a collective, held every few steps: as many as take
# STOP_CHECK_S, 1 to STOP_CHECK_EVERY. Slow steps (a large model on CPUs) are checked every step, so the
# run stops well within the grace torchrun gives after passing a signal on (30 s, then SIGKILL).
STOP_CHECK_S, STOP_CHECK_EVERY = 2.0, 10
STATE_SETTINGS = ("optim.", "schedule.")  # held by the optimizer's and scheduler's saved state
LIVE_SETTINGS = {"optim.grad_clip"}  # read at every step: a resumed run may change it


# `--smoke`: a few steps on a few images, seconds on CPU, through every code path (validation,
# checkpoints, resume). Applied before the user's --set overrides, which win.
SMOKE_OVERRIDES = ["data.limit=4", "data.batch_size=4", "data.patch_size=32", "data.workers=0",
                   "train.max_steps=6", "train.val_every=3", "train.ckpt_every=3", "train.log_every=1"]


class Trainer:
    def __init__(self, cfg: Config, out: Path, info: DistInfo, resume: bool = False, data_root: str | None = None):
        self.cfg, self.out, self.info = cfg, Path(out), info
        self.device = info.device
        cfg.train.precision = resolve_precision(cfg.train.precision, self.device)
        if slow := emulated_precision_warning(cfg.train.precision, self.device):
            log.warning(slow)
        self.ckpt_dir = self.out / "checkpoints"
        self.best_path = Path(cfg.train.best_checkpoint) if cfg.train.best_checkpoint else self.out / "image_compression_model.pth"
        self.stop_signal: str | None = None
        self.finished = self.validating = False
        self.lock = on_main_rank(lambda: self._claim_outputs(resume), info)  # None on the other ranks
        try:
            self._set_up(resume, data_root)
        except BaseException:
            self.close()  # the MLflow run a failed start began ends FAILED
            raise

    def _set_up(self, resume: bool, data_root: str | None) -> None:
        """Everything but the output folder's lock: state, model, data, the MLflow run."""
        cfg, info = self.cfg, self.info
        if info.is_main:
            remove_partial_writes(self.out, self.ckpt_dir)
        self.step = self.epoch = self.batch_in_epoch = 0  # batch: the loader's, of each rank
        self.best_psnr = -math.inf
        self.wall_time = 0.0  # seconds of the finished sessions of this run
        self.step_time = 0.0  # of which in training steps (not validations and checkpoints)
        self.paused = 0.0  # validation and checkpoint seconds of the current session
        self.budget = TimeBudget(cfg.train.time_budget_s, cfg.train.max_steps) if cfg.train.time_budget_s else None
        self.session_start: float | None = None
        self.history: dict[str, list] = {"step": [], "loss": [], "images_per_s": [], "val_step": [], "val_psnr": []}
        self.resume_changes = ""
        self.data_root = data_root or cfg.data.data_root or None
        if cfg.data.prepared_dir and cfg.data.backend != "synthetic":  # before a resume compares the settings
            on_every_rank(lambda: take_prepared_settings(cfg.data, self.data_root), info)
        run_id, state = on_every_rank(lambda: self._build(resume), info)

        self.data_cfg = prepared_data(cfg.data, self.out, self.data_root, info)
        saved_data = state.get("data") if state else None
        self.loader, self.validator = on_every_rank(lambda: self._build_data(saved_data), info)  # a data error is printed once
        torch.manual_seed(cfg.train.seed + 1 + info.rank)  # dropout etc. differ between ranks
        if state is not None and "rng" in state:
            torch.set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)].cpu())

        self.ddp_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if info.distributed else self.model
        self.step_model = torch.compile(self.ddp_model) if cfg.train.compile else self.ddp_model

        self.tracker = make_tracker(False, self.out)  # rank 0's MLflow run starts in _record_start
        on_main_rank(lambda: self._record_start(run_id), info)

    def _build(self, resume: bool) -> tuple[str | None, dict | None]:
        """The model, optimizer and schedule, from the newest training state on --resume, else from
        train.init_from or the seed. Returns the state's MLflow run and the state (or Nones)."""
        cfg = self.cfg
        check_model_fits(cfg, self.device)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model.arch, channels=cfg.data.channels, **cfg.model.kwargs).to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.macs_per_pixel = macs_per_pixel(self.model, cfg.data.channels + cfg.model.kwargs.get("cond_channels", 0))
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.loss_fn = build_loss(cfg)
        run_id = state = None
        found = load_latest(self.ckpt_dir, self.device) if resume else None
        if resume and found is None:
            log.info("--resume: no training state in %s, starting at step 0", self.ckpt_dir)
        if found is None and cfg.train.init_from:
            self.init_weights(cfg.train.init_from)
        if found is not None:
            state_file, state = found
            run_id = state.get("mlflow_run_id")
            self.load_state_dict(state, state_file)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", state_file, self.step, self.epoch, self.batch_in_epoch)
            if self.resume_changes:
                log.info("resumed with changed settings: %s", self.resume_changes)
        self.ema = WeightEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None  # from the weights as they start
        if self.ema and state is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:
                log.info("the state has no weight average: it starts from the weights at step %d", self.step)
        return run_id, state

    def _record_start(self, run_id: str | None) -> None:
        cfg = self.cfg
        self.tracker = make_tracker(cfg.tracking.enabled, self.out, cfg.tracking.offline, experiment=cfg.tracking.experiment,
                                    run_name=cfg.tracking.run_name or f"{cfg.model.arch}-{self.out.resolve().name}",
                                    tracking_uri=cfg.tracking.tracking_uri, run_id=run_id, timeout_s=cfg.tracking.timeout_s,
                                    tags={**system_tags(self.device, self.info.world_size, cfg.train.precision, self.loader.backend),
                                          "arch": cfg.model.arch,
                                          "data_root": str(self.data_root or ""), **{k: str(v) for k, v in cfg.tracking.tags.items()}})
        atomic_write_bytes(self.out / "config.toml", to_toml(cfg).encode())
        self.tracker.log_params({**flatten(to_dict(cfg)), "params": self.params, "out": str(self.out),
                                 "macs_per_pixel": round(self.macs_per_pixel)})
        self.tracker.log_artifact(self.out / "config.toml")
        if self.resume_changes:  # MLflow keeps a run's first params
            self.tracker.set_tags({f"changed_at_step_{self.step}": self.resume_changes})
        log.info("%s: %.3f M parameters, %s on %s, %s, %d patches a step, %d steps/epoch", cfg.model.arch, self.params / 1e6,
                 ranks_of(self.info.world_size), self.device, cfg.train.precision,
                 cfg.data.batch_size * self.info.world_size * cfg.train.grad_accum_steps, len(self.loader) // cfg.train.grad_accum_steps)

    def _claim_outputs(self, resume: bool) -> OutputLock:
        """The output folder's lock, once nothing of an earlier run would be written over and the
        training states and best model can be written (checked now, not when first saved)."""
        if self.best_path.is_dir():
            raise UserError(f"train.best_checkpoint {self.best_path} is a folder: name the model file")
        newest = latest_state(self.ckpt_dir)
        earlier = [f"training states up to {newest.name}"] if newest else []
        earlier += [f"a best model {self.best_path}"] if self.best_path.exists() else []
        if earlier and not resume:  # a new run here would write over them
            raise ckpt.CheckpointError(f"{self.out} holds an earlier run ({' and '.join(earlier)}): --resume continues "
                                       "it, another --out starts a new run")
        if not earlier:
            self._check_no_foreign_files()
        lock = OutputLock(self.out).acquire()
        try:
            for folder in (self.ckpt_dir, self.best_path.parent):
                check_output_folder(folder)
        except UserError:
            lock.release()
            raise
        return lock

    def _check_no_foreign_files(self) -> None:
        """An --out named by mistake keeps its files: a config.toml that is not a run's, or curves.png
        without a run's config.toml (written first), would be replaced (a folder would not)."""
        config, curves = self.out / "config.toml", self.out / "curves.png"
        if config.is_file():
            try:
                model = read_toml(config).get("model")
            except ConfigError:
                model = None
            if not (isinstance(model, dict) and "arch" in model):
                raise UserError(f"{config} is not a training run's config: another --out keeps it")
        elif curves.is_file():
            raise UserError(f"{curves} is not a training run's (no config.toml beside it): another --out keeps it")

    # ---- data ----
    def _build_data(self, saved_data: dict | None) -> tuple:
        self.data_fingerprints = check_same_data(self.data_cfg, self.cfg.data.prepared_dir or self.data_cfg.dataset, saved_data,
                                                 self.best_psnr, self.best_path)
        loader = build_loader(self.data_cfg, self.info.rank, self.info.world_size, self.device)
        if len(loader) < (k := self.cfg.train.grad_accum_steps):
            raise ConfigError(f"an epoch holds {len(loader)} batches of {self.data_cfg.batch_size} on each rank, fewer than "
                              f"the {k} micro-batches of a step (train.grad_accum_steps): lower it or data.batch_size")
        validator = Validator(self.data_cfg, self.cfg.train.precision, self.loss_fn, self.info) \
            if self.data_cfg.backend != "synthetic" else None  # synthetic data: nothing to validate on
        return loader, validator

    # ---- one step ----
    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step on the gradients of the micro-batches (train.grad_accum_steps); their mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0
        for i, (inp, target) in enumerate(batches):
            if self.cfg.train.channels_last:
                inp, target = inp.contiguous(memory_format=torch.channels_last), target.contiguous(memory_format=torch.channels_last)
            local = self.ddp_model.no_sync() if self.info.distributed and i < len(batches) - 1 else contextlib.nullcontext()
            with local:  # DDP averages the summed gradients over the ranks in the last backward only
                with autocast_for(self.cfg.train.precision, self.device):
                    out = self.step_model(inp)
                loss = self.loss_fn(out.float(), target) / len(batches)
                self.scaler.scale(loss).backward()
            total = total + loss.detach()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        if self.ema:
            self.ema.update(self.step)
        return total

    # ---- validation ----
    @property
    def eval_model(self) -> torch.nn.Module:
        """What is validated and saved as the best model: the weight average where there is one."""
        return self.ema.module if self.ema else self.model

    # ---- checkpoints ----
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "best_psnr": self.best_psnr, "wall_time": self.elapsed(), "step_time": self.elapsed_steps(),
                "history": self.history,
                "max_steps": self.cfg.train.max_steps, "config": flatten(to_dict(self.cfg)),
                "arch": self.cfg.model.arch, "kwargs": dict(self.cfg.model.kwargs), "mode": self.cfg.data.mode,
                "mlflow_run_id": getattr(self, "tracker", None) and self.tracker.run_id, "data": self.data_fingerprints,
                "world_size": self.info.world_size,
                **({"ema": self.ema.state_dict()} if self.ema else {})}

    def elapsed(self) -> float:
        """Seconds of this run over all its sessions, the current one included (validations and
        checkpoints too; elapsed_steps() is the training steps' part)."""
        return self.wall_time + (time.perf_counter() - self.session_start if self.session_start else 0.0)

    def elapsed_steps(self) -> float:
        """The part of elapsed() spent in training steps (data waits and the compile included)."""
        return self.step_time + (time.perf_counter() - self.session_start - self.paused if self.session_start else 0.0)

    def load_state_dict(self, state: dict, source="state") -> None:
        want = (self.cfg.model.arch, dict(self.cfg.model.kwargs), self.cfg.data.mode)
        have = (state.get("arch"), state.get("kwargs"), state.get("mode"))
        if want != have:
            raise ckpt.CheckpointError(f"{source} was saved by a {have[0]} {have[2]} model {have[1]}, "
                                       f"the config asks for {want[0]} {want[2]} {want[1]}")
        changes = {k: f"{k}: {old} -> {new}" for k, (old, new) in self._changed_settings(state).items()}
        ranks = (state.get("world_size", self.info.world_size), self.info.world_size)
        if ranks[0] != ranks[1]:  # the global batch with them (the learning rate was set for the old one)
            saved = state.get("config") or {}
            patches = (int(saved.get("data.batch_size", self.cfg.data.batch_size)) * int(saved.get("train.grad_accum_steps", 1)),
                       self.cfg.data.batch_size * self.cfg.train.grad_accum_steps)
            changes["ranks"] = f"ranks: {ranks[0]} -> {ranks[1]} ({ranks[0] * patches[0]} -> {ranks[1] * patches[1]} patches a step)"
        fixed = [said for k, said in changes.items()
                 if k.startswith(STATE_SETTINGS) and k not in LIVE_SETTINGS and k in state["config"]]  # not a newer key
        if fixed:  # torch's load_state_dict would put the saved ones back, or fail on another kind
            raise ckpt.CheckpointError(f"{source} continues a run whose optimizer and schedule keep their settings: --resume "
                                       f"cannot change {', '.join(fixed)} (new ones from its weights: another --out with "
                                       f"--set train.init_from={self.best_path})")
        self.resume_changes = ", ".join(changes.values())
        ckpt.load_weights(self.model, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for key in ("step", "epoch", "best_psnr", "wall_time"):
            setattr(self, key, state[key])
        self.batch_in_epoch = self._position_in_epoch(state)
        self.step_time = state.get("step_time", self.wall_time)  # states of older versions: all of it
        self.history = {**self.history, **state["history"]}
        if self.budget and "max_steps" in state:  # the step count fitted to the time budget so far
            self.cfg.train.max_steps = min(state["max_steps"], self.budget.max_steps)
        elif state.get("max_steps", self.cfg.train.max_steps) != self.cfg.train.max_steps:
            self._refit_schedule(state["max_steps"])

    def _position_in_epoch(self, state: dict) -> int:
        """The saved run's position in its epoch in this run's batches: its ranks took a prefix of
        the epoch's order (each a stride of it), so another rank count or batch size continues the
        same stream, exactly where this run's batches of all ranks divide the patches taken."""
        batches = state.get("batch_in_epoch", state.get("step_in_epoch"))  # older states: one batch a step
        saved_batch = int((state.get("config") or {}).get("data.batch_size", self.cfg.data.batch_size))
        taken = batches * saved_batch * state.get("world_size", self.info.world_size)
        per_batch = self.cfg.data.batch_size * self.info.world_size
        if taken % per_batch:
            log.warning("the run took %d patches of epoch %d, not a whole number of this run's %d-patch batches (%d ranks x "
                        "data.batch_size %d): the last %d come again", taken, state["epoch"], per_batch, self.info.world_size,
                        self.cfg.data.batch_size, taken % per_batch)
        return taken // per_batch

    def _refit_schedule(self, saved_steps: int) -> None:
        """A run resumed with another train.max_steps: its cosine ends at the new count (torch's is
        periodic: left as saved, it would climb back to the peak rate after the old end)."""
        set_total_steps(self.scheduler, self.cfg.train.max_steps, self.cfg.schedule.warmup_steps)
        if self.cfg.schedule.name == "cosine" and self.step >= saved_steps:
            log.warning("the run had finished its cosine schedule at step %d: the steps added run at schedule.min_lr "
                        "(a new cycle from its weights: another --out with train.init_from=%s)", saved_steps, self.best_path)

    def _changed_settings(self, state: dict) -> dict[str, tuple]:
        """{key: (saved, now)} for the settings a resumed run changed (states from before this
        record have none); the step count a time budget refits is left out."""
        saved, now = state.get("config") or {}, flatten(to_dict(self.cfg))
        budget = {"train.max_steps"} if self.budget else set()
        return {k: (saved.get(k), v) for k, v in now.items() if saved and k not in budget and str(saved.get(k)) != str(v)}

    def init_weights(self, path: str) -> None:
        """Start from the weights of a model checkpoint of the same architecture (a gray run may
        start from an RGB model: its first and last layers are folded to luma; a run told the
        quality may start from a blind model: the quality plane's kernels start at zero)."""
        blob = ckpt.load(path, self.device)
        try:
            state, adapted = ckpt.starting_weights(blob, self.model, self.cfg.model.arch, self.cfg.model.kwargs,
                                                   self.cfg.data.mode, path)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"train.init_from {e}") from None
        ckpt.load_weights(self.model, state, path)
        log.info("initialised the weights from %s (step %s of its run%s)", path, blob.get("step"), adapted and f"; {adapted}")

    def save_state(self) -> None:
        rng = gather_objects(torch.get_rng_state(), self.info)  # every rank's generator

        def write() -> None:
            ckpt.save({**self.state_dict(), "rng": rng}, state_path(self.ckpt_dir, self.step))
            prune_states(self.ckpt_dir)
            log.info("saved training state at step %d", self.step)
        on_main_rank(write, self.info)

    def _save_best(self, metrics: dict) -> None:
        blob = ckpt.model_checkpoint(self.eval_model, self.cfg.model.arch, self.cfg.model.kwargs, self.cfg.data.mode,
                                     to_dict(self.cfg), metrics, self.step)
        blob["mlflow_run_id"] = self.tracker.run_id
        ckpt.save(blob, self.best_path)

    # ---- the loop ----
    def _on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum).name
        log.warning("rank %d got %s: saving a checkpoint and stopping", self.info.rank, self.stop_signal)

    def _should_stop(self) -> bool:
        """True on every rank, at the same step, once any rank got a stop signal."""
        if not self.info.distributed:
            return self.stop_signal is not None
        if self.step < self.next_stop_check:
            return False
        own, now = signal.Signals[self.stop_signal] if self.stop_signal else 0, self.elapsed_steps()
        signum, seconds = max_over_ranks([own, now - self.last_stop_check[1]], self.info)
        self.next_stop_check = self.step + steps_between_stop_checks(seconds, self.step - self.last_stop_check[0])
        self.last_stop_check = (self.step, now)
        if signum and self.stop_signal is None:  # the signal reached another rank only
            self.stop_signal = signal.Signals(int(signum)).name
        return bool(signum)

    def fit(self) -> None:
        """Trains to train.max_steps; SIGTERM / SIGINT meanwhile save a state and stop (_on_signal)."""
        earlier = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.profiler = StepProfiler(self.cfg.train.profile_steps, self.out, self.info.rank, self.device, lambda: self.step)
        try:
            self._fit()
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if (found := out_of_memory(exc)) is not None:
                raise self._out_of_memory(found) from None
            if self.info.distributed and (said := lost_other_ranks(exc)):  # the rank that left first says why
                log.error("lost the other ranks at step %d (%s): stopping", self.step, said)
                raise ReportedElsewhere(said) from None
            raise
        finally:  # after fit the signals act as before (a SIGTERM while the quickstart evaluates ends it)
            self.profiler.close()  # after an error: the trace up to it
            for sig, handler in earlier.items():
                signal.signal(sig, handler)

    def _fit(self) -> None:
        t = self.cfg.train
        planned = None if self.budget and self.step == 0 else t.max_steps  # a budget's first fit comes with its second window
        progress = Progress(self.info.is_main, planned, self.step, (self.history["val_psnr"] or [None])[-1])
        self.session_start = time.perf_counter()
        self.next_stop_check, self.last_stop_check = self.step + 1, (self.step, self.elapsed_steps())
        window = {"loss": torch.zeros((), device=self.device), "n": 0, "data": 0.0, "start": time.perf_counter()}
        try:  # the bar closed on an error too: the error's lines below it
            stopped, plateaued = self._steps(progress, window, plateaued=self._plateaued())  # a plateaued resumed run ends at once
        finally:
            progress.close()
        self.profiler.close()  # a window the session ended in: the steps recorded
        self.wall_time, self.step_time = self.elapsed(), self.elapsed_steps()
        self.session_start, self.paused = None, 0.0
        if self.step % t.ckpt_every:  # else the loop has just saved this step
            self.save_state()
        if stopped and self.step < t.max_steps:  # a stop on the last step is a finished run
            log.warning("stopped by %s at step %d; resume with --resume", self.stop_signal, self.step)
            on_main_rank(self._record_stop, self.info)
            return
        if plateaued and self.step < t.max_steps:
            log.info("early stop at step %d: %d validations without a validation PSNR above %.3f dB by more than %g dB "
                     "(train.early_stop_patience)", self.step, t.early_stop_patience, self._validations_since_gain()[0], t.early_stop_min_db)
            on_main_rank(lambda: self.tracker.set_tags({"early_stopped_at_step": self.step}), self.info)
        self._finish()

    def _steps(self, progress: "Progress", window: dict, plateaued: bool) -> tuple[bool, bool]:
        """Steps until train.max_steps, a stop signal or a plateau: (stopped, plateaued)."""
        t, stopped = self.cfg.train, False
        while self.step < t.max_steps and not stopped and not plateaued:
            self.loader.set_epoch(self.epoch, self.batch_in_epoch)
            epoch_start = time.perf_counter()
            for batches in _in_groups(_timed(self.loader, window), t.grad_accum_steps):
                window["loss"] += self.train_step(batches)
                window["n"] += 1
                self.step += 1
                self.batch_in_epoch += len(batches)
                if self.budget and self.step % t.log_every == 0:  # first: the window's line shows the count fitted
                    self._fit_to_budget(progress)
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self._log_window(window, progress)
                pause = time.perf_counter()
                if self.step % t.val_every == 0 or self.step == t.max_steps:
                    self._validate_and_track(progress)
                    plateaued = self._plateaued()
                if self.step % t.ckpt_every == 0:
                    self.save_state()
                self.profiler.step()  # writes the trace after its last step
                paused = time.perf_counter() - pause
                window["start"] += paused  # throughput and the time budget count training steps only
                self.paused += paused
                stopped = self._should_stop()
                if stopped or plateaued or self.step >= t.max_steps:
                    break
            else:  # the epoch ran to its end
                self.tracker.log_metrics({"epoch_time_s": time.perf_counter() - epoch_start, "epoch": self.epoch}, self.step)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return stopped, plateaued

    def _validations_since_gain(self) -> tuple[float, int]:
        """(the best validation PSNR by early_stop_min_db's rule, the validations since it), from the
        history: a resumed run counts its earlier sessions' validations too."""
        best, since = -math.inf, 0
        for psnr in self.history["val_psnr"]:
            best, since = (psnr, 0) if psnr > best + self.cfg.train.early_stop_min_db else (best, since + 1)
        return best, since

    def _plateaued(self) -> bool:
        patience = self.cfg.train.early_stop_patience
        return bool(patience) and self._validations_since_gain()[1] >= patience

    def _record_stop(self) -> None:
        """A time-boxed chunk (GPU calls) keeps its best model and curves in the run, which ends KILLED
        here, while the other ranks wait: the first rank to exit 128 + signal makes torchrun SIGTERM
        the rest, and rank 0, its own handler gone after fit, died before close() and left it RUNNING."""
        self.tracker.set_tags({"stopped_by": self.stop_signal, "stopped_at_step": self.step})
        self._log_outputs()
        self.tracker.close("KILLED")

    def _log_window(self, window: dict, progress: "Progress") -> None:
        n = max(window["n"], 1)
        elapsed = time.perf_counter() - window["start"]
        loss = float(window["loss"]) / n  # the one host sync of the logging interval
        if any_rank(not math.isfinite(loss), self.info):
            self._diverged(f"the training loss is {loss} over the last {n} steps")
        images = n * self.cfg.data.batch_size * self.info.world_size * self.cfg.train.grad_accum_steps
        metrics = {"train_loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": images / elapsed,
                   # forward 2 FLOP per MAC, backward about twice the forward: 6 FLOP per MAC and pixel
                   "train_tflops": images * self.cfg.data.patch_size**2 * 6 * self.macs_per_pixel / elapsed / 1e12,
                   "step_time_s": elapsed / n, "data_wait_s": window["data"] / n}
        self.history["step"].append(self.step)
        self.history["loss"].append(loss)
        self.history["images_per_s"].append(metrics["images_per_s"])
        self.tracker.log_metrics(metrics, self.step)
        progress.update(self.step, metrics)
        window.update(loss=torch.zeros((), device=self.device), n=0, data=0.0, start=time.perf_counter())

    def _fit_to_budget(self, progress: "Progress") -> None:
        """train.max_steps (and the end of the cosine schedule) refitted to the time budget."""
        total = self.budget.fit(self.step, self.elapsed() if self.cfg.train.time_budget_wall else self.elapsed_steps())
        if total is None:  # the session's first window: the rate is measured from here
            return
        if self.info.distributed:  # the same count on every rank
            total = all_reduce_sum(torch.tensor(float(total), dtype=torch.float64, device=self.device), self.info)
            total = int(total.item() / self.info.world_size)
        total = max(total, self.step)
        if total < self.cfg.schedule.warmup_steps and self.cfg.train.max_steps >= self.cfg.schedule.warmup_steps:
            log.warning("the time budget fits %d steps, fewer than the %d warm-up steps: the schedule will not "
                        "reach its end (lower schedule.warmup_steps)", total, self.cfg.schedule.warmup_steps)
        if total != self.cfg.train.max_steps:
            self.cfg.train.max_steps = total
            set_total_steps(self.scheduler, total, self.cfg.schedule.warmup_steps)
        progress.set_total(total)
        self.tracker.log_metrics({"planned_steps": total}, self.step)

    def _kept(self) -> str:
        newest = latest_state(self.ckpt_dir)
        kept = [f"the newest state {newest}"] if newest else []
        kept += [f"the best model {self.best_path}"] if self.best_path.exists() else []
        return f"{' and '.join(kept) or 'nothing'} kept from before"

    def _diverged(self, what: str) -> None:
        remedies = "lower optim.lr, set optim.grad_clip" + (" or use train.precision=fp32" if self.cfg.train.precision != "fp32" else "")
        raise TrainingDiverged(f"training diverged at step {self.step}: {what} ({remedies}); {self._kept()}")

    def _out_of_memory(self, found: str) -> "OutOfMemory":
        d, t = self.cfg.data, self.cfg.train
        model = f"{self.cfg.model.arch} ({self.params / 1e6:.3g} M parameters, {t.precision})"  # 3 digits: 0.0201 M, 9.46 M
        where = f"out of memory on {self.device}" + (f" (rank {self.info.rank})" if self.info.distributed else "")
        if self.validating:
            what = (f"validating at step {self.step} ({found}): {model} on the held-out images in {TILE}-px tiles needs "
                    f"more than the device has: make the model smaller")
        else:
            what = (f"in training step {self.step + 1} ({found}): a batch of {d.batch_size} {d.patch_size}x{d.patch_size} "
                    f"patches through {model} needs more than the device has: lower data.batch_size (train.grad_accum_steps keeps the patches a "
                    "step) or data.patch_size")
        return OutOfMemory(f"{where} {what}; {self._kept()}")

    def _validate_and_track(self, progress: "Progress") -> None:
        if self.validator is None:
            return
        start = time.perf_counter()
        self.validating = True
        metrics = self.validator(self.eval_model)
        self.validating = False
        metrics["val_time_s"] = time.perf_counter() - start  # rank 0's; the GPU machine's runs record the metric pool's gain
        self.model.train()
        if not math.isfinite(metrics["val_psnr"]):  # the same on every rank (summed over them)
            self._diverged(f"the validation PSNR is {metrics['val_psnr']}")
        if abs(metrics["val_psnr_gain"]) < 1e-3 and self.step >= 100 and self.info.is_main:
            log.warning("step %d: the model's output still rounds to its JPEG input (%+.4f dB): dead activations? "
                        "(docs/experiments.md: BatchNorm or a lower optim.lr)", self.step, metrics["val_psnr_gain"])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics["val_psnr"])
        self.history["val_step"].append(self.step)
        self.history["val_psnr"].append(metrics["val_psnr"])
        progress.validated(self.step, metrics)
        on_main_rank(lambda: self._record_validation(metrics), self.info)

    def _record_validation(self, metrics: dict) -> None:
        self.tracker.log_metrics(metrics, self.step)
        if metrics["val_psnr"] > self.best_psnr:
            self.best_psnr = metrics["val_psnr"]
            self._save_best(metrics)
            for name, q, original, jpeg, restored in self.validator.figures:
                atomic_write_bytes(self.out / "val_images" / f"{name}_q{q}.png",
                                   side_by_side(original, jpeg, restored, f"{name} q{q} step {self.step}"))
        self._write_curves()

    def _write_curves(self) -> None:
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager": not the run's news
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        a.plot(self.history["step"], self.history["loss"])
        a.set(xlabel="step", ylabel=f"train {self.cfg.train.loss} loss", yscale="log")
        b.plot(self.history["val_step"], self.history["val_psnr"], marker="o")
        b.set(xlabel="step", ylabel="validation PSNR (dB)")
        fig.suptitle(f"{self.cfg.model.arch}: {self.params / 1e6:.2f} M parameters")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=90)
        plt.close(fig)
        atomic_write_bytes(self.out / "curves.png", png.getvalue())

    def _check_weights_in_sync(self) -> bool:
        digest = float(sum(p.detach().double().sum() for p in self.model.parameters()))
        digests = gather_objects(digest, self.info)
        return all(d == digests[0] for d in digests)

    def _finish(self) -> None:
        in_sync = self._check_weights_in_sync()
        if not in_sync:
            raise RuntimeError("ranks ended with different weights (DDP out of sync)")
        on_main_rank(self._record_finish, self.info)
        self.finished = True

    def _record_finish(self) -> None:
        self.tracker.log_metrics({"total_wall_time_s": self.wall_time, "total_step_time_s": self.step_time,
                                  "best_val_psnr": self.best_psnr}, self.step)
        self.tracker.set_tags({"weights_in_sync": "true", "best_checkpoint": str(self.best_path)})
        self._log_outputs()
        in_sync = f", weights in sync on {ranks_of(self.info.world_size)}" if self.info.world_size > 1 else ""
        log.info("done: %d steps in %.0f s, best validation PSNR %.3f dB%s -> %s",
                 self.step, self.wall_time, self.best_psnr, in_sync, self.best_path)

    def _log_outputs(self) -> None:
        """The best checkpoint, the curves, the validation images and rank 0's profiles (their tables;
        the traces stay in <out>/profile) as artifacts of the MLflow run."""
        for path in (self.best_path, self.out / "curves.png"):
            if path.is_file():
                self.tracker.log_artifact(path)
        for folder, files in (("val_images", "*"), ("profile", "rank0_*.txt")):
            for p in sorted((self.out / folder).glob(files)):
                self.tracker.log_artifact(p, folder)

    def close(self) -> None:
        """Ends the MLflow run (FINISHED after a complete run, KILLED when stopped, FAILED on error) and
        the validation's and the loader's worker processes."""
        if hasattr(self, "tracker"):
            failed = sys.exc_info()[0] is not None
            self.tracker.close("FINISHED" if self.finished else ("KILLED" if self.stop_signal and not failed else "FAILED"))
        if getattr(self, "validator", None) is not None:
            self.validator.close()
        if getattr(self, "loader", None) is not None:
            self.loader.close()
        if self.lock is not None:
            self.lock.release()


class TrainingDiverged(UserError, RuntimeError):
    """The loss or the validation PSNR is no longer a number; the message says what is kept."""


class OutOfMemory(UserError, RuntimeError):
    """A training step or a validation needed more memory than the device has; the message says what is kept."""


def check_model_fits(cfg: Config, device: torch.device) -> None:
    """A model whose weights, gradients and optimizer state alone exceed the free memory (of each GPU,
    or of the host for all of its CPU ranks) is a one-line error, not a process the OOM killer ends
    without a word (a U-Net of 9 levels: 8 G parameters)."""
    free = free_memory(device)
    if free is None:
        return
    n = sum(p.numel() for p in meta_model(cfg.model.arch, cfg.model.kwargs, cfg.data.channels).parameters())
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1  # CPU ranks share the host
    need = n * state_bytes_per_parameter(cfg) * ranks
    if need > free:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in cfg.model.kwargs.items())
        here = f" for its {ranks} ranks on this host" if ranks > 1 else ""
        raise ConfigError(f"{cfg.model.arch}({kwargs}) has {n / 1e6:,.0f} M parameters: their weights, gradients and "
                          f"{cfg.optim.name} state take {need / 2**30:.1f} GiB{here}, more than the {free / 2**30:.1f} GiB "
                          f"free on {device.type}: make the model smaller")


def ranks_of(world_size: int) -> str:
    return f"{world_size} rank{'s' if world_size > 1 else ''}"


def steps_between_stop_checks(seconds: float, steps: int) -> int:
    """As many steps as take STOP_CHECK_S at the pace of the last `steps` (which took `seconds`), 1 to STOP_CHECK_EVERY."""
    per_step = seconds / max(steps, 1)
    return STOP_CHECK_EVERY if per_step * STOP_CHECK_EVERY <= STOP_CHECK_S else max(1, int(STOP_CHECK_S / per_step))


def _in_groups(batches, size: int):
    """Lists of `size` consecutive batches; a shorter last one is passed over (the epoch ends there)."""
    batches = iter(batches)
    while len(group := list(itertools.islice(batches, size))) == size:
        yield group


def _timed(loader, window: dict):
    """Yields the loader's batches, adding the time spent waiting for each to window['data']."""
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        window["data"] += time.perf_counter() - t0
        if batch is None:
            return
        yield batch
