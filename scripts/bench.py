"""Speed benchmark: our U-Net and autoencoder against diffusers at matched sizes, and the costs around them.

    python scripts/bench.py                 # full (a few minutes on 2 CPU cores)
    python scripts/bench.py --quick         # fewer repetitions (≤ 2 min on 2 cores; indicative only)
    python scripts/bench.py --json out.json --device cuda --compile   # + SD-1.5 U-Net MFU, eager and compiled

Every timed figure is the median over repetitions interleaved in one process (ours, reference, ours, …), so a
slower or busier machine moves both sides alike. Ratios are ours/diffusers: below 1 is faster. Our side runs
with the framework's defaults (channels_last, fused Adam/AdamW, bf16 autocast on CUDA); diffusers' side as a
user would run it (its defaults, torch's default AdamW, the same autocast). A row whose package (diffusers,
lpips, webdataset) or device is missing is skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm_train.config import CONF_DIR
from ldm_train.models.autoencoder import Autoencoder
from ldm_train.models.unet import UNet
from ldm_train.utils.flops import count_flops, resolve_peak_tflops

# Matched reference sizes: diffusers U-Net 6.29M, AutoencoderKL 3.88M parameters (within 3% of ours, tested).
UNET_OURS = dict(in_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
                 num_heads=8, context_dim=384, num_groups=32)
UNET_DIFFUSERS = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
                      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                            "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                      cross_attention_dim=384, attention_head_dim=8)  # diffusers' legacy name: 8 heads
AE_OURS = dict(f=8, in_channels=3, resolution=64, ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=1, attn_resolutions=[],
               z_channels=4, num_groups=32, dropout=0.0, regularizer={"name": "kl", "sample": True})
AE_DIFFUSERS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 128, 128),
                    layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64)
# The quickstart's stage-2 shapes: KL f=4 autoencoder at 32 px (ch 16), the `small` U-Net, 384-wide context.
QUICK_AE = dict(f=4, in_channels=3, resolution=32, ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, attn_resolutions=[],
                z_channels=3, num_groups=8, dropout=0.0, regularizer={"name": "kl", "sample": True})


class Skip(Exception):
    """A row that cannot run here; the message says why."""


class Bench:
    def __init__(self, device: str, quick: bool, compile_ours: bool, reps: int | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.quick, self.compile = quick, compile_ours
        self.warmup, self.reps = (2, 5) if quick else (3, 15)
        if reps:
            self.warmup, self.reps = 1, reps
        if self.cuda:  # the trainer CUDA defaults (trainer.benchmark, float32_matmul_precision), process-wide,
            torch.backends.cudnn.benchmark = True  # so the diffusers side runs with them too
            torch.set_float32_matmul_precision("high")
        self.results: dict[str, float | int | str] = {}
        self.table: list[tuple[str, str, str, str]] = []

    def autocast(self):
        # bf16 autocast on CUDA for both sides, as our trainer's `precision: auto` does; fp32 on the CPU
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def interleaved(self, fns: dict[str, Callable[[], object]], reps: int | None = None) -> dict[str, float]:
        """Median seconds per call of each fn, the calls interleaved rep by rep."""
        for fn in fns.values():
            for _ in range(self.warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(min(reps or self.reps, self.reps)):
            for name, fn in fns.items():
                self.sync()
                t0 = time.perf_counter()
                fn()
                self.sync()
                times[name].append(time.perf_counter() - t0)
        return {k: statistics.median(v) for k, v in times.items()}

    def row(self, name: str, ours: str, ref: str, figure: str) -> None:
        self.table.append((name, ours, ref, figure))
        print(f"  {name:<34}{ours:>16}{ref:>16}  {figure}", flush=True)

    def train_step(self, forward_loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            with self.autocast():
                loss = forward_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    # ---------------------------------------------------------------- rows
    def unet(self) -> None:
        diffusers = _import("diffusers")
        torch.manual_seed(0)
        b = 32 if self.cuda else 8
        ours = _ours(UNet(**UNET_OURS), self.device)
        ref = diffusers.UNet2DConditionModel(**UNET_DIFFUSERS).to(self.device)
        n_ours, n_ref = _params(ours), _params(ref)
        assert abs(n_ours / n_ref - 1) < 0.03, f"U-Net sizes differ: {n_ours} vs {n_ref}"
        x = torch.randn(b, 4, 16, 16, device=self.device)
        t = torch.randint(0, 1000, (b,), device=self.device)
        ctx = torch.randn(b, 16, 384, device=self.device)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns = {"ours": self.train_step(lambda: F.mse_loss(ours(x_cl, t, ctx).float(), x), _adamw(ours, fused=True)),
               "ref": self.train_step(lambda: F.mse_loss(ref(x, t, ctx).sample.float(), x),
                                       torch.optim.AdamW(ref.parameters(), lr=1e-4))}  # torch's defaults
        m = self.interleaved(fns)
        self.versus_diffusers("unet", f"U-Net train step (batch {b})", n_ours, n_ref, m)

    def autoencoder(self) -> None:
        diffusers = _import("diffusers")
        torch.manual_seed(0)
        b = 32 if self.cuda else 8
        ours = _ours(Autoencoder(AE_OURS), self.device)
        ref = diffusers.AutoencoderKL(**AE_DIFFUSERS).to(self.device)
        n_ours, n_ref = _params(ours), _params(ref)
        assert abs(n_ours / n_ref - 1) < 0.03, f"autoencoder sizes differ: {n_ours} vs {n_ref}"
        x = torch.rand(b, 3, 64, 64, device=self.device) * 2 - 1
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def ours_loss() -> torch.Tensor:  # reconstruction only: L1 + KL, no perceptual or adversarial term
            rec, log = ours(x_cl)
            return (rec.float() - x).abs().mean() + 1e-6 * log["kl"]

        def ref_loss() -> torch.Tensor:
            posterior = ref.encode(x).latent_dist
            rec = ref.decode(posterior.sample()).sample
            return (rec.float() - x).abs().mean() + 1e-6 * posterior.kl().mean()

        fns = {"ours": self.train_step(ours_loss, _adam(ours, fused=True)),
               "ref": self.train_step(ref_loss, _adam(ref))}
        m = self.interleaved(fns)
        self.versus_diffusers("ae", f"AE generator step (batch {b}, 64 px)", n_ours, n_ref, m)

    def versus_diffusers(self, key: str, label: str, n_ours: int, n_ref: int, m: dict[str, float]) -> None:
        """Record `<key>_params_*`, `<key>_ms_*`, `<key>_step_ratio_vs_diffusers` and print the row."""
        ratio = m["ours"] / m["ref"]
        self.results.update({f"{key}_params_ours": n_ours, f"{key}_params_diffusers": n_ref,
                             f"{key}_ms_ours": 1e3 * m["ours"], f"{key}_ms_diffusers": 1e3 * m["ref"],
                             f"{key}_step_ratio_vs_diffusers": ratio})
        self.row(label, f"{1e3 * m['ours']:.1f} ms", f"{1e3 * m['ref']:.1f} ms",
                 f"ratio {ratio:.3f}  (params {n_ours / 1e6:.3f}M vs {n_ref / 1e6:.3f}M)")

    def stage1(self) -> None:
        _import("lpips")
        import warnings

        import yaml

        from ldm_train.losses.autoencoder_loss import AutoencoderLoss

        loss_cfg = yaml.safe_load((CONF_DIR / "autoencoder/default.yaml").read_text())["loss"]
        perceptual = dict(loss_cfg["perceptual"], weights="random")  # no downloads; the cost is the same
        warnings.filterwarnings("ignore", message=".*RANDOM.*backbone")
        torch.manual_seed(0)
        b = 32 if self.cuda else 8
        ae = _ours(Autoencoder(AE_OURS), self.device)
        loss = AutoencoderLoss(reduction="sum", reg_weight=1e-6, reg_key="kl", perceptual=perceptual,
                               disc=dict(loss_cfg["disc"], in_channels=3), disc_start=0,
                               disc_weight=loss_cfg["disc_weight"]).to(self.device)
        opt_g, opt_d = _adam(ae, fused=True), _adam(loss.discriminator, fused=True)
        x = (torch.rand(b, 3, 64, 64, device=self.device) * 2 - 1).contiguous(memory_format=torch.channels_last)

        def step() -> None:  # what AutoencoderModule.training_step does after disc_start
            with self.autocast():
                xrec, reg_log = ae(x)
                g_loss, _ = loss.generator_loss(x, xrec, reg_log, 1, ae.last_layer)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            with self.autocast():
                d_loss, _ = loss.discriminator_loss(x, xrec, 1)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

        m = self.interleaved({"ours": step})
        self.results.update(stage1_full_step_ms=1e3 * m["ours"])
        self.row(f"stage-1 full step (batch {b}, 64 px)", f"{1e3 * m['ours']:.1f} ms", "-",
                 f"{perceptual['net']} perceptual (random backbone) + PatchGAN, adaptive weight")

    def _quickstart_stage2(self):
        import yaml

        from ldm_train.models.text import build_text_encoder
        from ldm_train.pipeline.first_stage import FirstStage

        unet_cfg = yaml.safe_load((CONF_DIR / "unet/small.yaml").read_text())
        unet_cfg.update(context_dim=384, in_channels=3)
        unet_cfg.pop("kind")
        torch.manual_seed(0)
        unet = _ours(UNet(in_channels=3, **unet_cfg), self.device)
        # a stand-in for the quickstart's MiniLM (same 384 width): the text encoder is not what is measured here
        text = build_text_encoder({"name": "scratch", "dim": 384, "depth": 1, "heads": 4}).to(self.device).eval()
        first = FirstStage(Autoencoder(QUICK_AE).to(self.device).eval(),
                           {"scale_factor": 1.0, "raw_std": 1.0, "sample": True})
        return unet, text, first

    def sampling(self) -> None:
        from ldm_train.diffusion.parameterization import build_parameterization
        from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

        unet, text, first = self._quickstart_stage2()
        unet.eval()
        diffusion = {"schedule": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                     "prediction_type": "eps"}
        sampling = {"sampler": "ddim", "steps": 50, "guidance_scale": 3.0, "eta": 0.0, "seed": 0}
        pipe = LatentDiffusionPipeline(first, unet, text, build_parameterization(diffusion),
                                       {"resolution": 32, "sampling": sampling})
        n = 64 if self.cuda else (8 if self.quick else 32)
        prompts = ["a red circle on the left"] * n

        def run() -> None:
            with self.autocast():
                pipe.generate(prompts)

        m = self.interleaved({"ours": run}, reps=3)
        self.results.update(sample_seconds_per_image=m["ours"] / n)
        self.row(f"sampling, DDIM 50 + CFG ({n} images)", f"{m['ours'] / n * 1e3:.1f} ms/img", "-",
                 "quickstart U-Net (small), 32 px, f=4, batched [uncond, cond]")

    def cached_latents(self) -> None:
        unet, text, first = self._quickstart_stage2()
        b = 128 if self.cuda else 32
        images = torch.rand(b, 3, 32, 32, device=self.device) * 2 - 1
        with torch.no_grad():
            context = text(["a red circle on the left"] * b)
            latents = first.encode(images)
        opt = _adamw(unet, fused=True)

        def loss_on(z0: torch.Tensor) -> torch.Tensor:
            t = torch.randint(0, 1000, (b,), device=self.device)
            noise = torch.randn_like(z0)
            zt = (0.7 * z0 + 0.7 * noise).contiguous(memory_format=torch.channels_last)
            return F.mse_loss(unet(zt, t, context).float(), noise)

        fns = {"cached": self.train_step(lambda: loss_on(latents), opt),
               "encode": self.train_step(lambda: loss_on(first.encode(images)), opt)}
        m = self.interleaved(fns)
        self.results.update(stage2_ms_cached=1e3 * m["cached"], stage2_ms_encode=1e3 * m["encode"],
                            cached_latents_speedup=m["encode"] / m["cached"])
        self.row(f"stage-2 step, cached latents (b {b})", f"{1e3 * m['cached']:.1f} ms",
                 f"{1e3 * m['encode']:.1f} ms", f"speedup {m['encode'] / m['cached']:.2f}x vs encoding each step")

    def data(self) -> None:
        wds = _import("webdataset")
        from ldm_train.data.shapes import ShapesDataset
        from ldm_train.utils.images import to_uint8

        n, res = (512, 32) if self.quick else (4096, 64)
        ds = ShapesDataset(res, n, "train", 0)
        with tempfile.TemporaryDirectory() as tmp:
            with wds.ShardWriter(f"{tmp}/shard-%05d.tar", maxcount=256, verbose=0) as sink:
                for i in range(n):
                    item = ds[i]
                    sink.write({"__key__": f"{i:07d}", "png": to_uint8(item["image"]), "txt": item["caption"]})
            shards = sorted(str(p) for p in Path(tmp).glob("shard-*.tar"))
            loader = wds.WebLoader(wds.WebDataset(shards, shardshuffle=False, empty_check=False)
                                   .decode("torchrgb").to_tuple("png", "txt").batched(64), batch_size=None)

            def read() -> None:
                assert sum(len(batch[1]) for batch in loader) == n, "not every written sample was read back"

            m = self.interleaved({"read": read}, reps=3)
        self.results.update(data_samples_per_second=n / m["read"])
        self.row(f"data: shards → batches ({n} × {res} px)", f"{n / m['read']:.0f} /s", "-",
                 f"webdataset PNG+txt, {len(shards)} shards, decode + batch 64, 1 process")

    def sd15(self) -> None:
        if not self.cuda:
            raise Skip("needs a CUDA GPU (bf16 SD-1.5-size U-Net)")
        torch.manual_seed(0)
        unet = _ours(UNet.from_preset("sd15"), self.device)
        opt = _adamw(unet, fused=True)
        nets = {"eager": unet, **({"compiled": torch.compile(unet)} if self.compile else {})}

        def step(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> Callable[[], None]:
            return self.train_step(lambda: F.mse_loss(net(x, t, ctx).float(), x), opt)

        for b in (32, 16, 8):  # 64×64 latents (512 px images), 77 tokens; smaller batches if memory runs out
            inputs = (torch.randn(b, 4, 64, 64, device=self.device).contiguous(memory_format=torch.channels_last),
                      torch.randint(0, 1000, (b,), device=self.device), torch.randn(b, 77, 768, device=self.device))
            try:
                flops = count_flops(step(unet, *inputs))
                break
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        peak = resolve_peak_tflops(os.environ.get("PEAK_TFLOPS", "auto"), torch.device(self.device), "bf16-mixed")
        m = self.interleaved({k: step(net, *inputs) for k, net in nets.items()}, reps=5 if self.quick else 10)
        self.results.update(sd15_params=_params(unet), sd15_batch=b, sd15_gflops_per_step=flops / 1e9)
        for k, sec in m.items():
            tflops = flops / sec / 1e12
            self.results.update({f"sd15_{k}_ms": 1e3 * sec, f"sd15_{k}_tflops": tflops})
            if peak:
                self.results[f"sd15_{k}_mfu"] = tflops / peak
            self.row(f"SD-1.5 U-Net step bf16 {k} (b {b})", f"{1e3 * sec:.0f} ms", f"{tflops:.0f} TFLOP/s",
                     f"MFU {tflops / peak:.1%} of {peak:.0f}" if peak else "MFU: no peak known for this GPU")
        if peak:
            self.results["sd15_mfu"] = max(self.results[f"sd15_{k}_mfu"] for k in m)


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as exc:
        raise Skip(f"{name} is not installed ({exc}); `pip install {name}` (diffusers: the `bench` extra)") from exc


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _ours(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return module.to(device).to(memory_format=torch.channels_last).train()  # trainer.channels_last: true


def _stage_optimizer(stage: str, module: torch.nn.Module, fused: bool | None) -> torch.optim.Optimizer:
    """The optimizer of conf/<stage>/default.yaml (its `optimizer:` node), at lr 1e-4."""
    import yaml

    from ldm_train.lit.optim import build_optimizer

    spec = yaml.safe_load((CONF_DIR / stage / "default.yaml").read_text())["optimizer"]
    return build_optimizer(spec, [p for p in module.parameters() if p.requires_grad], 1e-4, fused)


def _adamw(module: torch.nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    return _stage_optimizer("diffusion", module, fused)  # AdamW


def _adam(module: torch.nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    return _stage_optimizer("autoencoder", module, fused)  # Adam, betas (0.5, 0.9)


ROWS = ("unet", "autoencoder", "stage1", "sampling", "cached_latents", "data", "sd15")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and images (indicative figures)")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd SD-1.5 U-Net (CUDA)")
    ap.add_argument("--only", nargs="+", choices=ROWS, help="run only these rows")
    ap.add_argument("--reps", type=int, help="repetitions per row (1 warm-up call each): a smoke check")
    args = ap.parse_args()
    bench = Bench(args.device, args.quick, args.compile, args.reps)
    name = torch.cuda.get_device_name(bench.device) if bench.cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench.py on {name}, torch {torch.__version__}, {'bf16 autocast' if bench.cuda else 'fp32'}"
          f"{', quick' if args.quick else ''}; medians of {bench.reps} interleaved repetitions")
    print(f"  {'row':<34}{'ours':>16}{'reference':>16}  figure")
    skipped = {}
    for row in args.only or ROWS:
        try:
            getattr(bench, row)()
        except Skip as why:
            skipped[row] = str(why)
            print(f"  {row:<34}{'skipped':>16}{'':>16}  {why}", flush=True)
    bench.results["skipped"] = skipped
    bench.results["device"] = name
    if args.json:
        Path(args.json).write_text(json.dumps(bench.results, indent=2))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in bench.results.items()}, indent=1))


if __name__ == "__main__":
    main()
