"""Stable Diffusion interop figures: `stage=import` and `stage=export format=diffusers`, then `format=single_file`
and `stage=import` of that file, of a randomly initialised pipeline (wall time, peak resident memory of the stage's
own process), and a model of ours sampled by diffusers' modules next to our own sampling (max pixel difference).
The imports skip measuring the latent scale on data (import.measure_samples=0): the figures are the conversion's.

    python scripts/bench_interop.py                   # SD-1.5 size (859.5M U-Net, 83.7M VAE, 123M CLIP text)
    python scripts/bench_interop.py --size tiny       # the tests' tiny pipeline (seconds)
    python scripts/bench_interop.py --ours artifacts/diffusion/kl_f4   # also: that model sampled by diffusers
    python scripts/bench_interop.py --only lora       # LoRA rank 8 against full fine-tuning of the sd15 U-Net

The LoRA row: trainable parameters and the median train-step time (forward, backward, AdamW; batch 1, 32×32
latents, fp32, this machine's CPU threads) of peft LoRA on the attention projections against full fine-tuning.

Each stage runs in a fresh `python -m ldm_train` process, so its peak RSS is its own (VmHWM of the
child's memory map; Linux only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _sd_tiny():
    """The tests' tiny SD builder (tests/sd_tiny.py), loaded by path: the benchmark reuses it, not a copy."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sd_tiny", ROOT / "tests" / "sd_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # diffusers' defaults otherwise
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=512)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77)


def build_sd15(folder: Path) -> None:
    """A randomly initialised SD-1.5-size pipeline saved in diffusers' layout (letter tokenizer: no CLIP vocab)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    SCHEDULER, tiny_tokenizer = _sd_tiny().SCHEDULER, _sd_tiny().tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(folder / "_tok")
    tokenizer.model_max_length = 77
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                        **SD15_TEXT))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE), text_encoder=text, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**SD15_UNET), scheduler=DDIMScheduler(**SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    n = sum(p.numel() for p in pipe.unet.parameters())
    print(f"built SD-1.5-size pipeline: U-Net {n / 1e6:.1f}M parameters")
    pipe.save_pretrained(folder)


STAGE = """import sys, time
from ldm_train.__main__ import main
sys.argv = ["ldm_train", *sys.argv[1:]]
start = time.perf_counter()
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
# VmHWM: the peak of this process's own memory map. Not ru_maxrss: Linux folds the forking parent's RSS into the
# child's ru_maxrss at exec, so a child of a big parent would report the parent's peak.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]
print("BENCH", time.perf_counter() - start, hwm)
"""


def timed_stage(args: list[str]) -> tuple[float, float]:
    """(wall seconds of the stage itself, peak RSS GiB of its process) of `python -m ldm_train <args>`, run in a
    fresh process (so the peak is its own; Python start-up and imports are outside the wall time)."""
    out = subprocess.run([sys.executable, "-c", STAGE, *args, "logger=none"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    _, wall, kib = next(line for line in out.splitlines() if line.startswith("BENCH")).split()
    return float(wall), int(kib) / 2**20


@torch.no_grad()
def sampled_by_diffusers(artifact: Path, out: Path, steps: int = 20) -> float:
    """Max |pixel| difference in [0, 1] between our `generate` and diffusers' AutoencoderKL + UNet2DConditionModel
    + DDIMScheduler (exported from the same artifact) from the same noise and the same prompt embeddings."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from ldm_train.models.unet import pooled_context
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_artifact(artifact)
    subprocess.run([sys.executable, "-m", "ldm_train", "stage=export", f"diffusion_path={artifact}", f"out={out}",
                    "logger=none"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    vae = AutoencoderKL.from_pretrained(out / "vae", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    sch = DDIMScheduler.from_pretrained(out / "scheduler", local_files_only=True)
    prompts, seed = ["a red circle on the left", "a blue square at the top"], 0
    g = float(pipe.sampling["guidance_scale"])
    labels = None
    if pipe.text_encoder.needs_labels:
        from ldm_train.data.shapes import captions_to_labels

        labels = captions_to_labels(prompts)
    ours = pipe.generate(prompts, sampler="ddim", steps=steps, seed=seed, labels=labels, eta=0.0)  # diffusers' default
    cond, uncond = pipe.text_encoder(prompts, labels=labels), pipe.text_encoder.unconditional("", len(prompts))
    x = torch.randn((len(prompts), *pipe.first_stage.latent_shape(pipe.resolution)),
                    generator=torch.Generator().manual_seed(seed))
    sch.set_timesteps(steps)
    context = torch.cat([uncond, cond])
    # unet.pooled_text, exported as a "projection" class embedding: the mean caption token as class_labels
    pooled = {"class_labels": pooled_context(context)} if unet.config.class_embed_type == "projection" else {}
    for t in sch.timesteps:
        out_u, out_c = unet(torch.cat([x, x]), t, encoder_hidden_states=context, **pooled).sample.chunk(2)
        x = sch.step(out_u + g * (out_c - out_u), t, x).prev_sample
    theirs = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)
    return float(((ours - theirs) / 2).abs().max())


def lora_vs_full(preset: str, rank: int = 8, latent: int = 32, steps: int = 3) -> dict:
    """Trainable parameters and median step seconds (after one warm-up step) of LoRA rank `rank` (alpha = rank,
    the default attention projections) and of full fine-tuning, on a randomly initialised U-Net `preset`."""
    from ldm_train.models.lora import add_lora, parameter_counts
    from ldm_train.models.unet import UNET_PRESETS, UNet

    context_dim = UNET_PRESETS[preset]["context_dim"]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, latent, latent, generator=g), torch.randn(1, 77, context_dim, generator=g)
    t = torch.tensor([500])
    row = {}
    for mode in ("full", "lora"):
        torch.manual_seed(0)
        unet = UNet.from_preset(preset).train()
        if mode == "lora":
            add_lora(unet, {"rank": rank, "alpha": None, "dropout": 0.0, "target_modules": None})
        trainable, total = parameter_counts(unet)
        opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            loss = unet(x, t, ctx).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        step = sorted(times[1:])[len(times[1:]) // 2]
        row.update({f"{mode}_trainable_params": trainable, f"{mode}_step_s": step})
        row.setdefault("unet_params", total)  # the base U-Net (the full run, before adapters)
        print(f"{preset} U-Net {mode:>4}: {trainable / 1e6:9.3f}M trainable of {total / 1e6:.1f}M, "
              f"step {step * 1e3:.0f} ms (median of {steps}, batch 1, {latent}x{latent} latents)")
        del unet, opt
    row["lora_step_vs_full"] = row["lora_step_s"] / row["full_step_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--ours", type=Path, help="a diffusion artifact of ours to export and sample with diffusers")
    parser.add_argument("--only", choices=["interop", "lora"],
                        help="one row: interop (import, export, diffusers sampling) or lora (LoRA vs full fine-tuning)")
    parser.add_argument("--lora-steps", type=int, default=3, help="timed steps per LoRA/full measurement")
    args = parser.parse_args()
    results = {}
    if args.only in (None, "lora"):
        results.update(lora_vs_full("sd15" if args.size == "sd15" else "tiny", steps=args.lora_steps))
    if args.only == "lora":
        print(json.dumps(results, indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="bench_interop_") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        if args.size == "sd15":
            build_sd15(tmp / "src")
        else:
            tiny_sd = _sd_tiny().tiny_sd

            tiny_sd(tmp / "src")
        print(f"source pipeline built and saved in {time.perf_counter() - start:.1f} s (not part of the figures)")
        common = [f"paths.artifacts={tmp / 'art'}", f"hydra.run.dir={tmp / 'run'}"]
        no_measure = "import.measure_samples=0"
        wall, peak = timed_stage(["stage=import", f"source={tmp / 'src'}", "name=sd", no_measure, *common])
        results.update(import_s=wall, import_peak_rss_gib=peak)
        print(f"stage=import ({args.size}): {wall:.1f} s wall, peak RSS {peak:.2f} GiB")
        wall, peak = timed_stage(["stage=export", "name=sd", f"out={tmp / 'out'}", *common])
        results.update(export_s=wall, export_peak_rss_gib=peak)
        print(f"stage=export format=diffusers ({args.size}): {wall:.1f} s wall, peak RSS {peak:.2f} GiB")
        single = tmp / "sd.safetensors"
        wall, peak = timed_stage(["stage=export", "format=single_file", "name=sd", f"out={single}", *common])
        results.update(export_single_file_s=wall, export_single_file_peak_rss_gib=peak)
        print(f"stage=export format=single_file ({args.size}): {wall:.1f} s wall, peak RSS {peak:.2f} GiB")
        wall, peak = timed_stage(["stage=import", f"source={single}", "name=sd_single", no_measure, *common])
        results.update(import_single_file_s=wall, import_single_file_peak_rss_gib=peak)
        print(f"stage=import of that single file ({args.size}): {wall:.1f} s wall, peak RSS {peak:.2f} GiB")
        ours = args.ours.resolve() if args.ours else (tmp / "art" / "diffusion" / "sd" if args.size == "tiny" else None)
        if ours is not None:  # default (tiny): the imported artifact, sampled as ours and by diffusers
            diff = sampled_by_diffusers(ours, tmp / "ours_out")
            results["ours_vs_diffusers_max_pixel_diff"] = diff
            print(f"{ours} sampled by diffusers vs ours (DDIM 20 steps, same noise): max |Δpixel| = {diff:.2e}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
