"""Progress of a training: a tqdm bar on a terminal (rank 0), plain log lines otherwise (Slurm logs)."""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time

from runtime.metrics import metrics

log = logging.getLogger("train.loop.trainer")


class Progress:
    def __init__(self, enabled: bool, total: int | None, initial: int, last_psnr: float | None = None):
        """total: None while unknown (a time budget before its first fit); last_psnr: the validation
        PSNR a resumed run ended on (None: not validated yet)."""
        self.enabled, self.total, self.start_step, self.start = enabled, total, initial, time.perf_counter()
        self.bar, self.redirect, self.postfix = None, contextlib.ExitStack(), {}
        self.last_psnr = last_psnr
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            self.redirect.enter_context(logging_redirect_tqdm())  # log lines above the bar, not onto its line

    def update(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.postfix = {"loss": f"{m['train_loss']:.4g}", "psnr": self._psnr(), "img_s": f"{m['images_per_s']:.0f}"}
            self.bar.set_postfix(self.postfix)  # in this order (keywords, tqdm sorts)
            return
        rate = (step - self.start_step) / max(time.perf_counter() - self.start, 1e-9)
        eta = (self.total - step) / rate if rate > 0 and self.total is not None else float("nan")
        log.info("step %d/%s loss %.5f lr %.3g img/s %.1f data_wait %.3fs val_psnr %s eta %s",
                 step, "?" if self.total is None else self.total, m["train_loss"], m["lr"], m["images_per_s"], m["data_wait_s"], self._psnr(),
                 time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?")

    def _psnr(self) -> str:
        """'-' before the first validation: 'nan' there read as a diverged run."""
        return "-" if self.last_psnr is None else f"{self.last_psnr:.2f}"

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def validated(self, step: int, m: dict) -> None:
        self.last_psnr = m["val_psnr"]
        if self.bar is not None and self.postfix:  # now, not at the next window: the last one's bar showed the one before
            self.bar.set_postfix({**self.postfix, "psnr": self._psnr()})
        if self.enabled:
            msg = f"validation at step {step}: " + " ".join(
                f"{x.label} {m['val_' + x.name]:.{x.digits + 2}f}" for x in metrics()) + \
                f" loss {m['val_loss']:.5f} ({m['val_psnr_gain']:+.3f} dB over the JPEG inputs, {m['val_time_s']:.1f} s)"
            log.info(msg)

    def close(self) -> None:
        self.redirect.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
