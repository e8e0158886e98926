"""Stable Diffusion interop: diffusers folders in (stage=import) and out (stage=export); one key table."""
