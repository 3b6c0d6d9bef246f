"""DGQ (distribution-aware group quantization, Ryu et al., ICLR 2025) for a UNet denoiser's
activations and attention scores, and the per-tensor min-max baseline it is compared with.

- `groups`: per-index activation statistics along channels and along positions, the axis
  choice by spread, K-means groups, and the input quantizer of one layer (buffers + hook).
- `log_quant`: the log2 quantizer of attention probabilities, its uniform counterpart, and
  the choice of delta by least squared error among high percentiles.
- `attention`: an attention processor of qtui's own (diffusers' processor interface) that
  quantizes the softmax output, keeps the cross-attention start-token column in full
  precision and scales delta per prompt, a block of rows at a time.
- `chunks`: the row blocks of an attention call, each under a bound of probabilities.
- `softmax_stats`: calibration statistics of one module's probabilities, block by block.
- `calibration`: calibrate with the full-precision model over the sampling trajectory, then
  quantize weights (RTN) and install the activation and attention quantizers.
"""
