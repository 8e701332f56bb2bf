"""What a run reports while it trains: the plain-text log, TensorBoard scalars and progress bars.

Only rank 0 reports. The text log goes to ``<exp_dir>/train.log`` and to stderr (through tqdm,
so that it does not tear the progress bar); TensorBoard event files go to
``<exp_dir>/tensorboard``. On resume, TensorBoard events newer than the checkpoint are purged so
that the curves do not fold back on themselves.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from tqdm import tqdm

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# Every speakerlab module logs below this name, so the training log also records what the data
# and model code report during the run.
PACKAGE_LOGGER = "speakerlab"


class TrainingMonitor:
    """Rank 0's log file, console log, TensorBoard writer and progress bars; silent elsewhere."""

    def __init__(self, exp_dir: str | Path, *, enabled: bool, progress_bar: bool = True) -> None:
        self.enabled = enabled
        self.show_progress = enabled and progress_bar
        self._logger = logging.getLogger(PACKAGE_LOGGER)
        self._previous_level = self._logger.level
        self._handlers: list[logging.Handler] = []
        self._writer = None
        self._redirect = contextlib.ExitStack()
        if not enabled:
            # Other ranks would repeat rank 0's messages; their errors still reach the entry point.
            self._logger.setLevel(logging.ERROR)
            return
        self.exp_dir = Path(exp_dir)
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        formatter = logging.Formatter(LOG_FORMAT)
        for handler in (
            logging.FileHandler(self.exp_dir / "train.log"),
            logging.StreamHandler(sys.stderr),
        ):
            handler.setFormatter(formatter)
            self._logger.addHandler(handler)
            self._handlers.append(handler)
        self._logger.setLevel(logging.INFO)
        if self.show_progress:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect.enter_context(logging_redirect_tqdm(loggers=[self._logger]))

    def start_tensorboard(self, purge_step: int) -> None:
        """Open the TensorBoard writer; events from ``purge_step`` on (left by an interrupted
        run that is now resumed) are dropped."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

        self._writer = SummaryWriter(str(self.exp_dir / "tensorboard"), purge_step=purge_step)

    def scalars(self, global_step: int, values: dict[str, float], prefix: str = "train") -> None:
        """Record ``values`` under ``<prefix>/<name>`` at ``global_step`` in TensorBoard."""
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}/{name}", value, global_step)

    def progress_bar(self, description: str, total: int, initial: int) -> tqdm:
        """A per-epoch bar with rate and ETA (a disabled one on other ranks)."""
        return tqdm(
            total=total,
            initial=initial,
            desc=description,
            unit="batch",
            disable=not self.show_progress,
            dynamic_ncols=True,
            leave=False,
        )

    def close(self) -> None:
        """Flush and detach everything (runs may follow each other in one process)."""
        self._redirect.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for handler in self._handlers:
            self._logger.removeHandler(handler)
            handler.close()
        self._handlers.clear()
        self._logger.setLevel(self._previous_level)
