"""How a metric key is shown: its axis label (with unit) and which direction is better.

Keys are the honest names the evaluation writes (`fd_shapes`, `rfd_shapes`, `fid` only with Inception, ...); a
label always contains the key itself, so a figure never renames a substituted metric to the published one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    key: str
    unit: str            # "" for unitless
    higher_is_better: bool | None  # None: no direction known (not guessed)

    @property
    def direction(self) -> str:
        if self.higher_is_better is None:
            return ""
        return "↑ higher is better" if self.higher_is_better else "↓ lower is better"

    def label(self, sep: str = ", ") -> str:
        """`key (unit), ↑ higher is better` (`sep="\n"`: on two lines, for a y axis)."""
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.key}{unit}" + (f"{sep}{self.direction}" if self.direction else "")


# key prefix → (unit, higher is better); the longest matching prefix wins
_RULES = {
    "recon_psnr": ("dB", True), "recon_ssim": ("", True), "recon_lpips": ("", False), "recon_l1": ("", False),
    "rfid": ("", False), "rfd_": ("", False), "fid": ("", False), "fd_": ("", False),
    "caption_alignment": ("fraction of samples", True), "recon_caption_alignment": ("fraction of images", True),
    "samples_per_second": ("samples/s", True),
    "train_seconds": ("s", False), "ms_per_step": ("ms", False),
}


def metric_info(key: str) -> MetricInfo:
    """The label and direction of `key`; an unknown key gets neither unit nor direction."""
    matches = [p for p in _RULES if key.startswith(p) or key.endswith(p)]
    if not matches:
        return MetricInfo(key, "", None)
    unit, higher = _RULES[max(matches, key=len)]
    return MetricInfo(key, unit, higher)


# Stage 1 once logged its validation metrics without the `recon_` prefix that stage=evaluate uses; run folders and
# artifacts written then still hold these keys.
_OLD_RECON_KEYS = ("psnr", "ssim", "l1", "lpips")


def current_name(key: str) -> str:
    """The name a metric of a metrics.json has today: `psnr` → `recon_psnr`, `lpips_randalex` →
    `recon_lpips_randalex`; every other key unchanged."""
    return f"recon_{key}" if key in _OLD_RECON_KEYS or key.startswith("lpips_") else key


def with_current_names(metrics: dict) -> dict:
    """`metrics` with old keys renamed (`current_name`); a key present under both names keeps the current one."""
    return {current_name(k): v for k, v in metrics.items() if current_name(k) == k or current_name(k) not in metrics}
