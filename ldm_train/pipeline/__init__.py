"""The seam between the stages: the autoencoder artifact with its calibrated scale factor (`FirstStage`), its
calibration, the diffusion artifact, and the trained pipeline that joins them."""
